//! The proxy side's table of requests waiting for an answer, keyed by stream id: the one
//! multiplexing core the byte-stream transports share (`transport-uds`, `transport-grpc`).
//!
//! A transport gives every request a numeric stream id of its connection, registers the
//! request's waiter here under the same lock that queues its frame (so its answer always finds
//! it), and hands each answer to the waiter its stream id names. Cancelling by correlation id
//! fails every request of that id with [`TransportError::Cancelled`]; a request whose future was
//! dropped is forgotten (an answer arriving later is simply late); a connection that dies takes
//! every waiter out at once and fails them all with the same error.
//!
//! The table does no I/O and needs no runtime: waking a waiter is sending on a
//! `tokio::sync::oneshot`, which works from any thread. [`take`](PendingRequests::take) and
//! [`take_all`](PendingRequests::take_all) hand waiters out so the transport can answer them
//! after releasing its lock, keeping the critical section short.
//!
//! Stream ids are hashed with foldhash's *quality* variant, seeded per table:
//! consecutive ids spread over the buckets like a random function (the *fast* variant bunches
//! them for some seeds; `transport-uds`'s `streams.rs` has the measurements), and a peer cannot
//! aim ids at one bucket without knowing the seed.

use std::collections::HashMap;

use tokio::sync::oneshot;

use crate::decision::Decision;
use crate::error::TransportError;
use crate::event::{CancelReason, CorrelationId};

/// Where a request's answer (or its failure) is sent.
pub type Reply = oneshot::Sender<Result<Decision, TransportError>>;

/// A request waiting for its answer.
#[derive(Debug)]
pub struct Waiter {
    correlation_id: CorrelationId,
    reply: Reply,
}

impl Waiter {
    /// The correlation id the request was sent for.
    pub fn correlation_id(&self) -> &CorrelationId {
        &self.correlation_id
    }

    /// Hands the request its answer (or failure). A caller that stopped waiting is not told.
    pub fn answer(self, answer: Result<Decision, TransportError>) {
        let _ = self.reply.send(answer);
    }

    /// The correlation id, for a cancel to the agent; nothing is answered.
    pub fn into_correlation_id(self) -> CorrelationId {
        self.correlation_id
    }
}

/// Requests waiting for answers on one connection, by stream id.
#[derive(Debug, Default)]
pub struct PendingRequests {
    waiting: HashMap<u64, Waiter, foldhash::quality::RandomState>,
}

impl PendingRequests {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the request sent on `stream`. A stream id still waiting is replaced (a
    /// transport never reuses one: ids are counters).
    pub fn insert(&mut self, stream: u64, correlation_id: CorrelationId, reply: Reply) {
        self.waiting.insert(stream, Waiter { correlation_id, reply });
    }

    /// Takes out the request waiting on `stream`, to answer it (after releasing the lock the
    /// table is under) or to forget it. `None` if nothing waits there: it was answered,
    /// cancelled or abandoned already, and the answer in hand is late.
    pub fn take(&mut self, stream: u64) -> Option<Waiter> {
        self.waiting.remove(&stream)
    }

    /// Fails every request of `correlation_id` with [`TransportError::Cancelled`]`(reason)`
    /// and calls `cancelled` with each one's stream id and correlation id, for the transport to
    /// tell the agent.
    pub fn cancel(
        &mut self,
        correlation_id: &CorrelationId,
        reason: CancelReason,
        mut cancelled: impl FnMut(u64, CorrelationId),
    ) {
        let streams: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.correlation_id == *correlation_id)
            .map(|(s, _)| *s)
            .collect();
        for stream in streams {
            if let Some(waiter) = self.waiting.remove(&stream) {
                let _ = waiter.reply.send(Err(TransportError::Cancelled(reason)));
                cancelled(stream, waiter.correlation_id);
            }
        }
    }

    /// Takes every waiter out, leaving the table empty: the connection is over. Fail them
    /// with [`AllWaiters::fail`] once the lock is released.
    pub fn take_all(&mut self) -> AllWaiters {
        AllWaiters(std::mem::take(&mut self.waiting).into_values().collect())
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True if no request waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// Every request that was waiting on a connection that is over.
#[derive(Debug)]
#[must_use = "the waiters wait until they are failed"]
pub struct AllWaiters(Vec<Waiter>);

impl AllWaiters {
    /// Fails every one of them with `error`, at once.
    pub fn fail(self, error: &TransportError) {
        for waiter in self.0 {
            waiter.answer(Err(error.clone()));
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(
        table: &mut PendingRequests,
        stream: u64,
        id: &str,
    ) -> oneshot::Receiver<Result<Decision, TransportError>> {
        let (reply, answer) = oneshot::channel();
        table.insert(stream, id.into(), reply);
        answer
    }

    #[test]
    fn an_answer_reaches_the_request_its_stream_id_names() {
        let mut table = PendingRequests::new();
        let mut one = waiting(&mut table, 1, "a");
        let mut two = waiting(&mut table, 2, "b");
        table.take(2).expect("waiting").answer(Ok(Decision::allow()));
        assert_eq!(two.try_recv().unwrap(), Ok(Decision::allow()));
        assert!(one.try_recv().is_err(), "the other request still waits");
        assert!(table.take(2).is_none(), "a second answer on the same stream is late");
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn cancel_fails_every_request_of_that_correlation_id_only() {
        let mut table = PendingRequests::new();
        let mut first = waiting(&mut table, 1, "r");
        let mut second = waiting(&mut table, 2, "r");
        let mut other = waiting(&mut table, 3, "s");
        let mut told = Vec::new();
        table.cancel(&"r".into(), CancelReason::Timeout, |stream, id| told.push((stream, id)));
        told.sort_by_key(|(s, _)| *s);
        assert_eq!(told, [(1, "r".into()), (2, "r".into())]);
        for answer in [&mut first, &mut second] {
            assert_eq!(answer.try_recv().unwrap(), Err(TransportError::Cancelled(CancelReason::Timeout)));
        }
        assert!(other.try_recv().is_err());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_closed_connection_fails_everything_at_once() {
        let mut table = PendingRequests::new();
        let mut answers: Vec<_> = (0..100).map(|i| waiting(&mut table, i, "x")).collect();
        let all = table.take_all();
        assert!(table.is_empty());
        assert_eq!(all.len(), 100);
        let error = TransportError::Closed { connection: "c#1".into(), reason: "eof".into() };
        all.fail(&error);
        for answer in &mut answers {
            assert_eq!(answer.try_recv().unwrap(), Err(error.clone()));
        }
    }

    #[test]
    fn an_abandoned_request_gives_back_its_correlation_id_and_is_not_answered() {
        let mut table = PendingRequests::new();
        let mut answer = waiting(&mut table, 9, "gone");
        let waiter = table.take(9).unwrap();
        assert_eq!(waiter.correlation_id().as_str(), "gone");
        assert_eq!(waiter.into_correlation_id().as_str(), "gone");
        assert!(matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
    }
}
