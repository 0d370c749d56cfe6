//! Connection accounting for graceful stops.
//!
//! Every accepted socket is wrapped in [`TrackedIo`], which holds an RAII guard counted by the
//! server's [`Tracker`]. The guard lives as long as the socket: through hyper's connection, and,
//! after an HTTP upgrade, inside the upgraded I/O object the handler owns. So a drain waits for
//! upgraded connections (WebSockets…) too, without handler cooperation. At the deadline every
//! remaining socket is "killed": its next read or write fails, and a task parked on a read is
//! woken to see it, which closes connections the accept loop does not own (upgraded ones).
//!
//! The tracker also keeps the connection caps ([`Limits`](crate::Limits)): it counts open
//! connections in all and per client (address, or /64 prefix for IPv6) and refuses to track a
//! socket over either cap. The per-client counts sit in the same map lock as the kill switches,
//! taken once when a connection opens and once when it closes, never per request.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::counters::Counters;

/// The kill switch of one socket, with the waker of the last task that found it unreadable.
///
/// The waker sits behind a lock rather than in an `AtomicWaker`: registering happens on every
/// read that would block, killing once per stop, so [`TrackedIo`] keeps a copy of the waker it
/// stored and takes the lock only when the reading task changes (a read that blocks then costs
/// no atomic read-modify-write at all), and a kill wakes the stored waker without taking it.
#[derive(Debug, Default)]
struct Kill {
    killed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Kill {
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        let waker = self.waker.lock().clone();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Counts the open connections of one run of a server.
#[derive(Debug)]
pub(crate) struct Tracker {
    active: AtomicUsize,
    zero: Notify,
    next_id: AtomicU64,
    conns: Mutex<Conns>,
    counters: Arc<Counters>,
}

/// The open connections' kill switches, and how many each client holds.
#[derive(Debug, Default)]
struct Conns {
    kills: HashMap<u64, Arc<Kill>>,
    per_client: HashMap<Client, usize>,
}

/// What one client is counted as for `max_connections_per_ip`: its IPv4 address (IPv4-mapped
/// IPv6 addresses included), or the /64 prefix of its IPv6 address, the block one subscriber
/// usually gets (counting single IPv6 addresses would let one host take a cap's worth of
/// connections per address it picks from its block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Client(IpAddr);

impl Client {
    pub(crate) fn of(ip: IpAddr) -> Client {
        match ip.to_canonical() {
            IpAddr::V6(v6) => Client(IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1)))),
            v4 => Client(v4),
        }
    }
}

/// The caps a new connection is checked against (from the server's [`Limits`](crate::Limits)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caps {
    pub(crate) total: Option<usize>,
    pub(crate) per_client: Option<usize>,
}

/// Why a connection was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The server holds `max_connections` already.
    Total,
    /// This client holds `max_connections_per_ip` already.
    PerClient,
}

/// Decrements the counts when the connection's socket is dropped.
#[derive(Debug)]
struct ConnGuard {
    tracker: Arc<Tracker>,
    id: u64,
    client: Client,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        {
            let mut conns = self.tracker.conns.lock();
            conns.kills.remove(&self.id);
            if let Some(n) = conns.per_client.get_mut(&self.client) {
                *n -= 1;
                if *n == 0 {
                    conns.per_client.remove(&self.client);
                }
            }
        }
        self.tracker.counters.connection_closed();
        if self.tracker.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.zero.notify_waiters();
        }
    }
}

impl Tracker {
    pub(crate) fn new(counters: Arc<Counters>) -> Arc<Self> {
        Arc::new(Tracker {
            active: AtomicUsize::new(0),
            zero: Notify::new(),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(Conns::default()),
            counters,
        })
    }

    /// Starts counting a socket from `client`, unless that would go over `caps`: then the socket
    /// is handed back with the reason, and counted as refused.
    ///
    /// Only the accept loop opens connections, so the count checked here can only go down
    /// before the connection is added.
    pub(crate) fn track<T>(
        self: &Arc<Self>,
        inner: T,
        client: Client,
        caps: Caps,
    ) -> Result<TrackedIo<T>, (T, Refused)> {
        if caps.total.is_some_and(|max| self.active() >= max) {
            self.counters.refused();
            return Err((inner, Refused::Total));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Kill::default());
        {
            let mut conns = self.conns.lock();
            let held = conns.per_client.entry(client).or_insert(0);
            if caps.per_client.is_some_and(|max| *held >= max) {
                if *held == 0 {
                    conns.per_client.remove(&client);
                }
                drop(conns);
                self.counters.refused();
                return Err((inner, Refused::PerClient));
            }
            *held += 1;
            conns.kills.insert(id, kill.clone());
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        self.counters.connection_opened();
        Ok(TrackedIo {
            inner,
            kill,
            registered: None,
            _guard: ConnGuard { tracker: self.clone(), id, client },
        })
    }

    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Waits until no connection is open or the deadline passes; returns how many were still
    /// open at the deadline (forced). Those sockets are killed.
    pub(crate) async fn drain(&self, deadline: Instant) -> u64 {
        loop {
            let notified = self.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active() == 0 {
                return 0;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let forced = self.active() as u64;
        let kills: Vec<Arc<Kill>> = self.conns.lock().kills.values().cloned().collect();
        for kill in kills {
            kill.kill();
        }
        forced
    }
}

/// A socket counted by a [`Tracker`] that fails once killed.
#[derive(Debug)]
pub(crate) struct TrackedIo<T> {
    inner: T,
    kill: Arc<Kill>,
    /// The waker last stored in `kill`, to skip storing the same one again.
    registered: Option<Waker>,
    _guard: ConnGuard,
}

impl<T> TrackedIo<T> {
    /// The socket inside.
    pub(crate) fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The same tracked connection around `f(socket)` (the socket moved to another runtime);
    /// on an error the connection is closed and no longer counted.
    pub(crate) fn try_map<U, E>(self, f: impl FnOnce(T) -> Result<U, E>) -> Result<TrackedIo<U>, E> {
        let TrackedIo { inner, kill, registered, _guard } = self;
        Ok(TrackedIo { inner: f(inner)?, kill, registered, _guard })
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        // Stored before `killed` is read: a kill either stores `killed` before our read (we see
        // it) or takes the lock after we stored the waker (it wakes this task).
        if !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *self.kill.waker.lock() = Some(waker.clone());
            self.registered = Some(waker);
        }
        if self.kill.killed.load(Ordering::Acquire) {
            Err(io::Error::new(io::ErrorKind::ConnectionAborted, "server stop deadline reached"))
        } else {
            Ok(())
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if res.is_pending() {
            self.check(cx)?;
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.kill.killed.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server stop deadline reached",
            )));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.kill.killed.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server stop deadline reached",
            )));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Requests in flight on one connection, and since when it has been idle (for the idle timeout
/// and, on HTTP/1, the header read timeout). A request is in flight from the handler's call until
/// its response body has been sent in full or dropped.
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    idle_since_nanos: AtomicU64,
    /// Set when the first request begins.
    begun: AtomicBool,
    /// Requests begun on the connection.
    started: AtomicU64,
    /// Requests whose answer was dropped before it was ready (the client gave up on them).
    abandoned: AtomicU64,
    /// See `Limits::max_abandoned_requests`.
    abandon_limit: u64,
    /// Set once the abandoned requests pass the limit: the connection is to be closed.
    abusive: AtomicBool,
}

/// Marks one request in flight until dropped.
pub(crate) struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    /// Notes that the request was abandoned before its answer was ready.
    pub(crate) fn abandon(&self) {
        let a = &self.0;
        let abandoned = a.abandoned.fetch_add(1, Ordering::Relaxed) + 1;
        if abandoned >= a.abandon_limit && abandoned * 2 > a.started.load(Ordering::Relaxed) {
            a.abusive.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_nanos.store(a.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    /// The activity of a new connection that may abandon `abandon_limit` requests (see
    /// `Limits::max_abandoned_requests`).
    pub(crate) fn new(abandon_limit: u32) -> Arc<Self> {
        Arc::new(Activity {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_nanos: AtomicU64::new(0),
            begun: AtomicBool::new(false),
            started: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            abandon_limit: u64::from(abandon_limit.max(1)),
            abusive: AtomicBool::new(false),
        })
    }

    /// True once the client has abandoned more requests than the limit allows.
    pub(crate) fn is_abusive(&self) -> bool {
        self.abusive.load(Ordering::Relaxed)
    }

    pub(crate) fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::Relaxed);
        // A plain load first: the store happens once per connection, not per request.
        if !self.begun.load(Ordering::Relaxed) {
            self.begun.store(true, Ordering::Relaxed);
        }
        RequestGuard(self.clone())
    }

    /// True once a request has begun on the connection.
    pub(crate) fn has_begun(&self) -> bool {
        self.begun.load(Ordering::Relaxed)
    }

    /// `None` while a request is in flight.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.base + std::time::Duration::from_nanos(self.idle_since_nanos.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Arc<Tracker> {
        Tracker::new(Arc::new(Counters::new("t", "127.0.0.1:1".parse().unwrap())))
    }

    fn ip(s: &str) -> Client {
        Client::of(s.parse().unwrap())
    }

    #[test]
    fn clients_are_ipv4_addresses_or_ipv6_slash_64_prefixes() {
        assert_eq!(ip("::ffff:192.0.2.1"), ip("192.0.2.1"), "a mapped IPv4 address is that address");
        assert_ne!(ip("192.0.2.1"), ip("192.0.2.2"));
        assert_eq!(ip("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2:bbbb::2"), "one /64");
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
    }

    #[test]
    fn caps_refuse_over_the_limit_and_free_up_when_a_connection_closes() {
        let t = tracker();
        let caps = Caps { total: Some(3), per_client: Some(2) };
        let (a, b) = (ip("2001:db8::1"), ip("2001:db8::2"));
        let first = t.track((), a, caps).unwrap();
        let _second = t.track((), b, caps).unwrap();
        assert_eq!(t.track((), a, caps).err().map(|e| e.1), Some(Refused::PerClient), "same /64");
        let other = t.track((), ip("192.0.2.1"), caps).unwrap();
        assert_eq!(t.track((), ip("192.0.2.9"), caps).err().map(|e| e.1), Some(Refused::Total));
        drop(other);
        drop(first);
        let _again = t.track((), a, caps).unwrap();
        assert_eq!(t.active(), 2);
        assert_eq!(t.counters.snapshot().refused, 2);
        assert_eq!(t.conns.lock().per_client.len(), 1, "counts of clients gone are removed");
    }
}
