//! Worker threads that serve connections, one event loop each (thread per core).
//!
//! A server whose configuration has [`Workers`](crate::HttpServerConfig::workers) still accepts
//! on its own task, wherever the server was started, but hands each accepted connection to the
//! worker with the fewest connections: a single-threaded tokio runtime on a thread of its own.
//! The connection, its handler and everything the handler spawns (an upstream connection, for
//! a proxy) then stay on that thread. Compared with one multi-threaded runtime, no task moves
//! between threads, no worker wakes another for work it could do itself, and the tasks woken by
//! one batch of I/O run in the order they were woken, so a burst of events produces a burst of
//! writes (the peers on the other end wake once for several of them, not once each) — the
//! layout of nginx's and Envoy's workers.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The index of the [`Workers`] thread this code runs on (`0..len`), `None` off a worker
/// thread (`pool_api::worker_index`, which these threads set). Lets a handler keep per-worker
/// state (a connection pool per worker, say) so that what a connection uses was made on its
/// own thread.
pub use pool_api::worker_index;

/// A set of worker threads, each running a single-threaded tokio runtime. A handle: clones
/// share the threads, which stop when the last clone is dropped (the tasks still on them are
/// dropped with their runtimes). Give it to servers with
/// [`HttpServerConfig::with_workers`](crate::HttpServerConfig::with_workers).
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    /// Connections on this worker now.
    connections: Arc<AtomicUsize>,
    /// Dropped with the set: the thread's `block_on` returns and its runtime is dropped.
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("threads", &self.len()).finish()
    }
}

impl Workers {
    /// Starts `threads` worker threads named `{name}-{i}` (at least one), each with a
    /// single-threaded runtime with I/O and timers enabled. Fails if a thread or a runtime
    /// cannot be created (the ones started are stopped again).
    pub fn start(threads: usize, name: &str) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(threads.max(1));
        for index in 0..threads.max(1) {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new().name(format!("{name}-{index}")).spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                pool_api::set_worker_index(Some(index));
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                // Runs the worker's tasks until the set is dropped.
                let _ = runtime.block_on(stopped);
            })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended before its runtime started"))??;
            workers.push(Worker { handle, connections: Arc::new(AtomicUsize::new(0)), _stop: stop });
        }
        Ok(Workers { inner: Arc::new(Inner { workers }) })
    }

    /// How many threads.
    pub fn len(&self) -> usize {
        self.inner.workers.len()
    }

    /// Always false: a set has at least one thread.
    pub fn is_empty(&self) -> bool {
        self.inner.workers.is_empty()
    }

    /// The runtime of worker `index`, to spawn work on it.
    pub fn handle(&self, index: usize) -> Option<&Handle> {
        self.inner.workers.get(index).map(|w| &w.handle)
    }

    /// The runtimes of all the workers, in index order.
    pub fn handles(&self) -> Vec<Handle> {
        self.inner.workers.iter().map(|w| w.handle.clone()).collect()
    }

    /// Connections on each worker now (served by servers of this crate).
    pub fn connections(&self) -> Vec<usize> {
        self.inner.workers.iter().map(|w| w.connections.load(Ordering::Relaxed)).collect()
    }

    /// Whether two handles share their threads.
    pub fn same_as(&self, other: &Workers) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The worker with the fewest connections now (the first of equals), and a guard that
    /// counts the connection there until dropped.
    pub(crate) fn pick(&self) -> (&Handle, Placed) {
        let worker = self
            .inner
            .workers
            .iter()
            .min_by_key(|w| w.connections.load(Ordering::Relaxed))
            .expect("a set has at least one worker");
        worker.connections.fetch_add(1, Ordering::Relaxed);
        (&worker.handle, Placed(worker.connections.clone()))
    }
}

/// One connection counted on its worker; dropped when the connection's task ends.
pub(crate) struct Placed(Arc<AtomicUsize>);

impl Drop for Placed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `future` with `placed` dropped when it ends or is dropped.
pub(crate) async fn placed<F: Future>(future: F, placed: Placed) -> F::Output {
    let out = future.await;
    drop(placed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_run_their_own_runtime_and_know_their_index() {
        let workers = Workers::start(3, "w").unwrap();
        assert_eq!(workers.len(), 3);
        for i in 0..3 {
            let (tx, rx) = std::sync::mpsc::channel();
            workers.handle(i).unwrap().spawn(async move {
                let _ = tx.send((worker_index(), std::thread::current().name().map(str::to_owned)));
            });
            assert_eq!(rx.recv().unwrap(), (Some(i), Some(format!("w-{i}"))));
        }
        assert_eq!(worker_index(), None);
    }

    #[test]
    fn pick_takes_the_least_loaded_worker_and_the_guard_gives_back() {
        let workers = Workers::start(2, "w").unwrap();
        let (_, a) = workers.pick();
        let (_, b) = workers.pick();
        assert_eq!(workers.connections(), vec![1, 1]);
        drop(a);
        assert_eq!(workers.connections(), vec![0, 1]);
        let (_, c) = workers.pick();
        assert_eq!(workers.connections(), vec![1, 1]);
        drop((b, c));
        assert_eq!(workers.connections(), vec![0, 0]);
    }

    #[test]
    fn dropping_the_last_handle_stops_the_threads() {
        let workers = Workers::start(1, "w").unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // A task that never ends holds `tx`; the runtime's end drops it.
        workers.handle(0).unwrap().spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        let copy = workers.clone();
        drop(workers);
        assert!(
            matches!(
                rx.recv_timeout(std::time::Duration::from_millis(100)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            ),
            "a clone still holds them"
        );
        drop(copy);
        assert!(rx.recv().is_err(), "the task was dropped with its runtime");
    }
}
