//! Connection accounting for graceful stops.
//!
//! Every accepted socket is wrapped in [`TrackedIo`], which holds an RAII guard counted by the
//! server's [`Tracker`]. The guard lives as long as the socket: through hyper's connection, and,
//! after an HTTP upgrade, inside the upgraded I/O object the handler owns. So a drain waits for
//! upgraded connections (WebSockets…) too, without handler cooperation. At the deadline every
//! remaining socket is "killed": its next read or write fails, and a task parked on a read is
//! woken to see it, which closes connections the accept loop does not own (upgraded ones).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

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
        let waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner).clone();
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
    kills: Mutex<HashMap<u64, Arc<Kill>>>,
    counters: Arc<Counters>,
}

/// Decrements the count when the connection's socket is dropped.
#[derive(Debug)]
struct ConnGuard {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.tracker.kills.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
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
            kills: Mutex::new(HashMap::new()),
            counters,
        })
    }

    /// Starts counting a socket.
    pub(crate) fn track<T>(self: &Arc<Self>, inner: T) -> TrackedIo<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Kill::default());
        self.kills.lock().unwrap_or_else(PoisonError::into_inner).insert(id, kill.clone());
        self.active.fetch_add(1, Ordering::AcqRel);
        self.counters.connection_opened();
        TrackedIo { inner, kill, registered: None, _guard: ConnGuard { tracker: self.clone(), id } }
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
        let kills: Vec<Arc<Kill>> =
            self.kills.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
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
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        // Stored before `killed` is read: a kill either stores `killed` before our read (we see
        // it) or takes the lock after we stored the waker (it wakes this task).
        if !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *self.kill.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
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
}

/// Marks one request in flight until dropped.
pub(crate) struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_nanos.store(a.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_nanos: AtomicU64::new(0),
        })
    }

    pub(crate) fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }

    /// `None` while a request is in flight.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.base + std::time::Duration::from_nanos(self.idle_since_nanos.load(Ordering::Relaxed)))
    }
}
