//! Which serving worker thread the current code runs on.
//!
//! A proxy that serves its connections on worker threads, one event loop each (thread per
//! core: httpserver-pool's `Workers`), marks each such thread with its index. Transports that
//! run a connection's I/O on a worker say so ([`AgentConnection::home`]), and the pool prefers,
//! for a request made on a worker, a connection at home there: the request, its agent
//! exchange and the answer's wake-up then stay on one thread.
//!
//! [`AgentConnection::home`]: crate::AgentConnection::home

use std::cell::Cell;
#[cfg(feature = "streams")]
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker thread this code runs on, `None` off a worker thread.
#[inline]
pub fn worker_index() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Marks the current thread as worker `index` (or, with `None`, as no worker). Called once by
/// whoever starts a worker thread, before it runs any task.
pub fn set_worker_index(index: Option<usize>) {
    INDEX.with(|i| i.set(index));
}

/// The runtimes a transport makes its new connections on, in turn: the `spread_over` of the
/// UDS and gRPC connectors. A connection made on a worker's runtime reports that worker as its
/// [`home`](crate::AgentConnection::home).
#[cfg(feature = "streams")]
#[derive(Debug)]
pub struct Placement {
    runtimes: Vec<tokio::runtime::Handle>,
    next: AtomicUsize,
}

#[cfg(feature = "streams")]
impl Placement {
    /// Placement over `runtimes`; `None` for an empty list (connections are then made wherever
    /// `connect` is called).
    pub fn new(runtimes: Vec<tokio::runtime::Handle>) -> Option<Self> {
        (!runtimes.is_empty()).then(|| Self { runtimes, next: AtomicUsize::new(0) })
    }

    /// The runtime the next connection goes to.
    pub fn next_runtime(&self) -> tokio::runtime::Handle {
        self.runtimes[self.next.fetch_add(1, Ordering::Relaxed) % self.runtimes.len()].clone()
    }
}

/// Runs `future` on `runtime` when given one (spawned there and awaited here, so that what it
/// registers and spawns lives there), else here. The error is the spawned task's: its runtime
/// shut down before it finished.
#[cfg(feature = "streams")]
pub async fn run_on<F>(
    runtime: Option<tokio::runtime::Handle>,
    future: F,
) -> Result<F::Output, tokio::task::JoinError>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime {
        None => Ok(future.await),
        Some(runtime) => runtime.spawn(future).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_is_per_thread() {
        assert_eq!(worker_index(), None);
        set_worker_index(Some(3));
        assert_eq!(worker_index(), Some(3));
        std::thread::spawn(|| assert_eq!(worker_index(), None)).join().unwrap();
        set_worker_index(None);
        assert_eq!(worker_index(), None);
    }

    #[cfg(feature = "streams")]
    #[test]
    fn placement_takes_the_runtimes_in_turn_and_run_on_runs_there() {
        assert!(Placement::new(Vec::new()).is_none(), "no runtimes: no placement");
        let workers: Vec<tokio::runtime::Runtime> =
            (0..2).map(|_| tokio::runtime::Builder::new_current_thread().build().unwrap()).collect();
        let ids: Vec<_> = workers.iter().map(|r| r.handle().id()).collect();
        let placement = Placement::new(workers.iter().map(|r| r.handle().clone()).collect()).unwrap();
        let turns: Vec<_> = (0..5).map(|_| placement.next_runtime().id()).collect();
        assert_eq!(turns, [ids[0], ids[1], ids[0], ids[1], ids[0]]);

        // Each runtime runs on a thread of its own, marked as its worker.
        let threads: Vec<_> = workers
            .into_iter()
            .enumerate()
            .map(|(i, runtime)| {
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let thread = std::thread::spawn(move || {
                    set_worker_index(Some(i));
                    let _ = runtime.block_on(stopped);
                });
                (stop, thread)
            })
            .collect();
        let here = tokio::runtime::Builder::new_current_thread().build().unwrap();
        here.block_on(async {
            let on_one = run_on(Some(placement.next_runtime()), async { worker_index() }).await.unwrap();
            assert_eq!(on_one, Some(1));
            assert_eq!(run_on(None, async { worker_index() }).await.unwrap(), None, "here: no worker");
        });
        for (stop, thread) in threads {
            drop(stop);
            thread.join().unwrap();
        }
    }
}
