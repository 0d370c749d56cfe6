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
//! A request may carry a deadline ([`insert_until`](PendingRequests::insert_until)). The table
//! keeps a lower bound of the earliest one, so the transport watches every deadline of a
//! connection with one timer: it arms it for [`arm`](PendingRequests::arm)'s instant, and when
//! it fires, [`expire`](PendingRequests::expire) fails the requests past their deadline and
//! gives the next instant. Registering a request costs a comparison, not a timer of its own;
//! the timer fires about once per deadline's length while requests come and go.
//!
//! Stream ids are hashed with foldhash's *quality* variant, seeded per table:
//! consecutive ids spread over the buckets like a random function (the *fast* variant bunches
//! them for some seeds; `transport-uds`'s `streams.rs` has the measurements), and a peer cannot
//! aim ids at one bucket without knowing the seed.

use std::collections::HashMap;

use tokio::sync::oneshot;
use tokio::time::Instant;

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
    deadline: Option<Instant>,
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
    /// No waiting request has a deadline before this; `None`: none has a deadline. Lowered by
    /// each insert, made exact again by [`expire`](Self::expire).
    earliest: Option<Instant>,
    /// What the transport's timer was last armed for ([`arm`](Self::arm)).
    armed: Option<Instant>,
}

impl PendingRequests {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the request sent on `stream`. A stream id still waiting is replaced (a
    /// transport never reuses one: ids are counters).
    pub fn insert(&mut self, stream: u64, correlation_id: CorrelationId, reply: Reply) {
        self.waiting.insert(stream, Waiter { correlation_id, reply, deadline: None });
    }

    /// Registers the request sent on `stream`, which must be answered by `deadline`.
    /// Returns true if the transport's timer must be armed again ([`arm`](Self::arm)): it is
    /// not armed, or armed for later than `deadline`.
    pub fn insert_until(
        &mut self,
        stream: u64,
        correlation_id: CorrelationId,
        reply: Reply,
        deadline: Instant,
    ) -> bool {
        self.waiting.insert(stream, Waiter { correlation_id, reply, deadline: Some(deadline) });
        if self.earliest.is_none_or(|e| deadline < e) {
            self.earliest = Some(deadline);
        }
        self.armed.is_none_or(|a| deadline < a)
    }

    /// When the transport's one timer must fire next: no waiting request has a deadline
    /// before it (`None`: none has one). Remembered as what the timer is armed for.
    pub fn arm(&mut self) -> Option<Instant> {
        self.armed = self.earliest;
        self.earliest
    }

    /// Fails every request whose deadline is at or before `now` with `error`, calls `expired`
    /// with each one's stream id and correlation id (for the transport to tell the agent), and
    /// returns when the timer must fire next, as [`arm`](Self::arm) does.
    pub fn expire(
        &mut self,
        now: Instant,
        error: &TransportError,
        mut expired: impl FnMut(u64, CorrelationId),
    ) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        let mut due = Vec::new();
        for (&stream, waiter) in &self.waiting {
            match waiter.deadline {
                Some(d) if d <= now => due.push(stream),
                Some(d) if earliest.is_none_or(|e| d < e) => earliest = Some(d),
                _ => {}
            }
        }
        for stream in due {
            if let Some(waiter) = self.waiting.remove(&stream) {
                let _ = waiter.reply.send(Err(error.clone()));
                expired(stream, waiter.correlation_id);
            }
        }
        self.earliest = earliest;
        self.arm()
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

    /// Fails every waiting request with [`TransportError::Cancelled`]`(reason)` and calls
    /// `cancelled` with each one's stream id and correlation id, for the transport to tell the
    /// agent; the connection goes on.
    pub fn cancel_all(&mut self, reason: CancelReason, mut cancelled: impl FnMut(u64, CorrelationId)) {
        self.earliest = None;
        for (stream, waiter) in self.waiting.drain() {
            let _ = waiter.reply.send(Err(TransportError::Cancelled(reason)));
            cancelled(stream, waiter.correlation_id);
        }
    }

    /// Takes every waiter out, leaving the table empty: the connection is over. Fail them
    /// with [`AllWaiters::fail`] once the lock is released.
    pub fn take_all(&mut self) -> AllWaiters {
        self.earliest = None;
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

/// The one timer a transport keeps for its table's deadlines: armed for the instant
/// [`PendingRequests::arm`] or [`PendingRequests::expire`] gives, disarmed by `None`.
#[derive(Debug)]
pub struct DeadlineTimer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: Option<Instant>,
}

impl Default for DeadlineTimer {
    fn default() -> Self {
        Self { sleep: Box::pin(tokio::time::sleep_until(Instant::now())), armed: None }
    }
}

impl DeadlineTimer {
    /// A timer armed for nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms the timer for `next` (it is reset only if that changes); `None` disarms it.
    pub fn set(&mut self, next: Option<Instant>) {
        if next != self.armed {
            if let Some(at) = next {
                self.sleep.as_mut().reset(at);
            }
            self.armed = next;
        }
    }

    /// True while armed: poll [`fired`](Self::fired) only then.
    pub fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Resolves when the instant it is armed for has come (at once if it is not armed: guard
    /// with [`is_armed`](Self::is_armed)).
    pub async fn fired(&mut self) {
        self.sleep.as_mut().await;
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
    fn cancel_all_fails_every_request_and_names_each() {
        let mut table = PendingRequests::new();
        let mut a = waiting(&mut table, 1, "a");
        let (_, mut b) = waiting_until(&mut table, 2, "b", Instant::now());
        let mut told = Vec::new();
        table.cancel_all(CancelReason::ProxyShutdown, |stream, id| told.push((stream, id)));
        told.sort_by_key(|(s, _)| *s);
        assert_eq!(told, [(1, "a".into()), (2, "b".into())]);
        for answer in [&mut a, &mut b] {
            assert_eq!(
                answer.try_recv().unwrap(),
                Err(TransportError::Cancelled(CancelReason::ProxyShutdown))
            );
        }
        assert!(table.is_empty());
        assert_eq!(table.arm(), None, "nothing left to time");
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

    fn waiting_until(
        table: &mut PendingRequests,
        stream: u64,
        id: &str,
        deadline: Instant,
    ) -> (bool, oneshot::Receiver<Result<Decision, TransportError>>) {
        let (reply, answer) = oneshot::channel();
        (table.insert_until(stream, id.into(), reply, deadline), answer)
    }

    #[test]
    fn the_timer_is_armed_again_only_for_an_earlier_deadline() {
        let t0 = Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let mut table = PendingRequests::new();
        assert_eq!(table.arm(), None, "nothing waits: no timer");
        let (rearm, _a) = waiting_until(&mut table, 1, "a", ms(100));
        assert!(rearm, "the timer is not armed yet");
        assert_eq!(table.arm(), Some(ms(100)));
        let (rearm, _b) = waiting_until(&mut table, 2, "b", ms(150));
        assert!(!rearm, "a later deadline is found when the armed one fires");
        let (rearm, _c) = waiting_until(&mut table, 3, "c", ms(50));
        assert!(rearm, "an earlier deadline needs the timer sooner");
        assert_eq!(table.arm(), Some(ms(50)));
        // A request without a deadline changes nothing.
        let _d = waiting(&mut table, 4, "d");
        assert_eq!(table.arm(), Some(ms(50)));
        // Answered requests leave the bound where it was: a timer firing early finds nothing.
        table.take(3).unwrap().answer(Ok(Decision::allow()));
        assert_eq!(table.arm(), Some(ms(50)));
    }

    #[test]
    fn expire_fails_only_what_is_past_its_deadline_and_says_when_to_look_again() {
        let t0 = Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let mut table = PendingRequests::new();
        let (_, mut early) = waiting_until(&mut table, 1, "early", ms(10));
        let (_, mut due) = waiting_until(&mut table, 2, "due", ms(20));
        let (_, mut late) = waiting_until(&mut table, 3, "late", ms(30));
        let mut forever = waiting(&mut table, 4, "forever");
        let error = TransportError::DeadlineExceeded { connection: "c#1".into() };
        let mut told = Vec::new();
        let next = table.expire(ms(20), &error, |stream, id| told.push((stream, id)));
        told.sort_by_key(|(s, _)| *s);
        assert_eq!(told, [(1, "early".into()), (2, "due".into())], "a deadline equal to now is past");
        assert_eq!(next, Some(ms(30)));
        assert_eq!(early.try_recv().unwrap(), Err(error.clone()));
        assert_eq!(due.try_recv().unwrap(), Err(error.clone()));
        assert!(late.try_recv().is_err() && forever.try_recv().is_err(), "the others still wait");
        assert_eq!(table.len(), 2);
        // Once the last deadline is gone there is nothing to arm for; the request without one
        // waits on.
        let next = table.expire(ms(1_000), &error, |_, _| {});
        assert_eq!(next, None);
        assert_eq!(late.try_recv().unwrap(), Err(error));
        assert!(forever.try_recv().is_err());
        let (rearm, _) = waiting_until(&mut table, 5, "next", ms(2_000));
        assert!(rearm, "after the timer was disarmed, a new deadline arms it");
        table.take_all().fail(&TransportError::Cancelled(CancelReason::Manual));
        assert_eq!(table.arm(), None, "an ended connection has nothing to time");
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

/// Loom models of the protocol the transports run around the table (`cargo xtask race`): the
/// table and a `closed` flag under one lock, a request registered only while the connection is
/// open, answers, cancels, abandons and the connection's end racing for the same waiters. Each
/// waiter must be handed out exactly once and every request that was registered must get
/// exactly one result: none stranded in a table nobody will look at again.
#[cfg(all(test, agentpool_loom))]
mod loom_streams {
    use loom::sync::{Arc, Mutex};
    use loom::thread;

    use super::*;

    type Answer = oneshot::Receiver<Result<Decision, TransportError>>;

    /// The connection's shared state as the transports hold it.
    #[derive(Default)]
    struct Conn {
        closed: bool,
        table: PendingRequests,
    }

    fn closed() -> TransportError {
        TransportError::Closed { connection: "c#1".into(), reason: "eof".into() }
    }

    /// Registers a request unless the connection is over (then it fails at once: `None`).
    fn register(conn: &Mutex<Conn>, stream: u64, id: &str) -> Option<Answer> {
        let mut c = conn.lock().unwrap();
        if c.closed {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        c.table.insert(stream, id.into(), reply);
        Some(answer)
    }

    /// The connection ends: everything waiting is taken out under the lock, failed after it.
    /// Returns how many were.
    fn close(conn: &Mutex<Conn>) -> usize {
        let all = {
            let mut c = conn.lock().unwrap();
            c.closed = true;
            c.table.take_all()
        };
        let n = all.len();
        all.fail(&closed());
        n
    }

    /// The answer a request got: exactly one, never none.
    fn result(answer: &mut Answer) -> Result<Decision, TransportError> {
        answer.try_recv().expect("every registered request gets exactly one result")
    }

    #[test]
    fn loom_answers_cancels_and_the_end_of_the_connection_hand_each_waiter_out_once() {
        loom::model(|| {
            let conn = Arc::new(Mutex::new(Conn::default()));
            let mut one = register(&conn, 1, "r").unwrap();
            let mut two = register(&conn, 2, "r").unwrap();
            let mut three = register(&conn, 3, "s").unwrap();
            // The reader task: answers arrive for streams 1 and 3.
            let reader = {
                let conn = conn.clone();
                thread::spawn(move || {
                    let mut answered = 0;
                    for stream in [1, 3] {
                        let waiter = conn.lock().unwrap().table.take(stream);
                        if let Some(waiter) = waiter {
                            waiter.answer(Ok(Decision::allow()));
                            answered += 1;
                        }
                    }
                    answered
                })
            };
            // The pool cancels correlation id "r" (streams 1 and 2).
            let canceller = {
                let conn = conn.clone();
                thread::spawn(move || {
                    let mut told = Vec::new();
                    conn.lock().unwrap().table.cancel(&"r".into(), CancelReason::Timeout, |s, id| {
                        assert_eq!(id.as_str(), "r");
                        told.push(s);
                    });
                    told
                })
            };
            let failed = close(&conn);
            let answered = reader.join().unwrap();
            let cancelled = canceller.join().unwrap();
            assert!(cancelled.iter().all(|s| *s == 1 || *s == 2), "{cancelled:?}");
            assert_eq!(answered + cancelled.len() + failed, 3, "each waiter handed out exactly once");
            assert!(conn.lock().unwrap().table.is_empty());
            let cancelled_error = Err(TransportError::Cancelled(CancelReason::Timeout));
            let one = result(&mut one);
            assert!(
                one == Ok(Decision::allow()) || one == cancelled_error || one == Err(closed()),
                "{one:?}"
            );
            let two = result(&mut two);
            assert!(two == cancelled_error || two == Err(closed()), "{two:?}");
            let three = result(&mut three);
            assert!(three == Ok(Decision::allow()) || three == Err(closed()), "{three:?}");
            assert_eq!(cancelled.contains(&1), one == cancelled_error);
            assert_eq!(cancelled.contains(&2), two == cancelled_error);
        });
    }

    #[test]
    fn loom_a_request_registered_as_the_connection_ends_is_failed_not_stranded() {
        loom::model(|| {
            let conn = Arc::new(Mutex::new(Conn::default()));
            let sender = {
                let conn = conn.clone();
                thread::spawn(move || register(&conn, 1, "r"))
            };
            let failed = close(&conn);
            let registered = sender.join().unwrap();
            assert!(conn.lock().unwrap().table.is_empty(), "nothing is left behind");
            match registered {
                Some(mut answer) => {
                    assert_eq!(failed, 1);
                    assert_eq!(result(&mut answer), Err(closed()));
                }
                None => assert_eq!(failed, 0, "refused after the end: nothing to fail"),
            }
        });
    }

    /// The pool's abort at the end of a drain (`pool-core`'s `Agent::abort_requests`): it sets
    /// a flag, then cancels everything waiting on the connection; a send registers on the
    /// connection, then checks the flag. Every send must be either cancelled by the abort or
    /// see the flag and cancel itself: none may wait on for an answer.
    #[test]
    fn loom_an_abort_reaches_every_send_on_the_connection_or_by_its_flag() {
        use loom::sync::atomic::{AtomicBool, Ordering};
        loom::model(|| {
            let conn = Arc::new(Mutex::new(Conn::default()));
            let aborted = Arc::new(AtomicBool::new(false));
            let sender = {
                let (conn, aborted) = (conn.clone(), aborted.clone());
                thread::spawn(move || {
                    let answer = register(&conn, 1, "r").expect("the connection is open");
                    (answer, aborted.load(Ordering::SeqCst))
                })
            };
            aborted.store(true, Ordering::SeqCst);
            let mut told = 0;
            conn.lock().unwrap().table.cancel_all(CancelReason::ProxyShutdown, |_, _| told += 1);
            let (mut answer, saw_flag) = sender.join().unwrap();
            let cancelled = match answer.try_recv() {
                Ok(result) => {
                    assert_eq!(result, Err(TransportError::Cancelled(CancelReason::ProxyShutdown)));
                    true
                }
                Err(_) => false,
            };
            assert_eq!(cancelled, told == 1);
            assert!(cancelled || saw_flag, "the send neither was cancelled nor saw the abort");
        });
    }

    #[test]
    fn loom_an_abandoned_request_and_its_late_answer_take_the_waiter_once() {
        loom::model(|| {
            let conn = Arc::new(Mutex::new(Conn::default()));
            let answer = register(&conn, 7, "gone").unwrap();
            // The request's future is dropped: it takes its waiter back to tell the agent.
            let abandon = {
                let conn = conn.clone();
                thread::spawn(move || {
                    drop(answer);
                    let waiter = conn.lock().unwrap().table.take(7);
                    waiter.map(Waiter::into_correlation_id)
                })
            };
            // Meanwhile the answer arrives.
            let waiter = conn.lock().unwrap().table.take(7);
            let answered = waiter.map(|w| w.answer(Ok(Decision::allow()))).is_some();
            let cancelled = abandon.join().unwrap();
            assert_ne!(answered, cancelled.is_some(), "exactly one side takes the waiter");
            if let Some(id) = cancelled {
                assert_eq!(id.as_str(), "gone");
            }
            assert!(conn.lock().unwrap().table.is_empty());
        });
    }
}
