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
use std::time::Duration;

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

/// How [`Workers`] threads behave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// How long a worker that has run out of work keeps checking its sockets and timers
    /// (without blocking) before it sleeps; zero (the default): it sleeps at once.
    ///
    /// Waking a sleeping thread takes the kernel's wake-up path, and on a virtual machine
    /// whose idle CPUs halt (a KVM guest with halt polling off, as on Firecracker) every such
    /// wake-up is a VM exit, 10–25 µs. A request that waits on a quick peer (an agent, an
    /// upstream on the same host) pays it once per hop. A worker that spins sees the answer
    /// as soon as it arrives. While it spins, it gives its CPU to any other runnable thread
    /// between checks (`sched_yield`), and it stops spinning and sleeps as soon as such a
    /// thread took the CPU: it uses only time the CPU would have spent idle. Work that
    /// arrives during the spin starts it again. The cost: a worker that has just been busy
    /// keeps a CPU busy for up to this long.
    pub spin: Duration,
}

impl WorkerOptions {
    /// These options with [`spin`](Self::spin) set.
    pub fn spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("threads", &self.len()).finish()
    }
}

impl Workers {
    /// Starts `threads` worker threads named `{name}-{i}` (at least one), each with a
    /// single-threaded runtime with I/O and timers enabled, with the default
    /// [`WorkerOptions`] (a worker with nothing to do sleeps at once). Fails if a thread or a
    /// runtime cannot be created (the ones started are stopped again).
    pub fn start(threads: usize, name: &str) -> io::Result<Workers> {
        Self::start_with(threads, name, WorkerOptions::default())
    }

    /// [`start`](Self::start) with `options`.
    pub fn start_with(threads: usize, name: &str, options: WorkerOptions) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(threads.max(1));
        for index in 0..threads.max(1) {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new().name(format!("{name}-{index}")).spawn(move || {
                let mut builder = tokio::runtime::Builder::new_current_thread();
                builder.enable_all();
                if !options.spin.is_zero() {
                    builder.on_thread_park(spin::before_park);
                }
                let runtime = match builder.build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                pool_api::set_worker_index(Some(index));
                if !options.spin.is_zero() {
                    runtime.spawn(spin::spinner(options.spin));
                }
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

/// The spin of [`WorkerOptions::spin`]: a task on each worker that, when the worker is about
/// to sleep, keeps it awake by yielding (tokio then checks the driver without blocking and
/// runs what that woke) until the spin runs out.
mod spin {
    use std::cell::RefCell;
    use std::task::{Poll, Waker};
    use std::time::Duration;

    use tokio::time::Instant;

    /// Between two turns of the spinner, a gap longer than this means other tasks ran: the
    /// worker is busy again, and the spin starts over when it runs out of work.
    const WORK_GAP: Duration = Duration::from_micros(5);
    /// A `sched_yield` that took longer than this gave the CPU to another thread (or the
    /// hypervisor took it).
    const CPU_WANTED: Duration = Duration::from_micros(5);
    /// After this many such yields in one spin, the CPU is wanted: the worker stops spinning
    /// and sleeps.
    const CPU_WANTED_TIMES: u32 = 3;

    /// The worker thread's spinner, as its park hook sees it.
    #[derive(Default)]
    struct State {
        /// The spinner, waiting for the worker's next idle moment.
        waker: Option<Waker>,
        /// Set by the park hook when it wakes the spinner.
        armed: bool,
        /// Set by the spinner when its spin ran out: the park that follows is a real one.
        spun: bool,
    }

    thread_local! {
        static STATE: RefCell<State> = RefCell::new(State::default());
    }

    /// The runtime's park hook: the worker has nothing to run. Unless the spinner has just
    /// spun, wakes it (tokio then does not block).
    pub(super) fn before_park() {
        STATE.with(|state| {
            let mut state = state.borrow_mut();
            if std::mem::take(&mut state.spun) {
                return;
            }
            if let Some(waker) = state.waker.take() {
                state.armed = true;
                waker.wake();
            }
        })
    }

    /// The worker's spinner task.
    pub(super) async fn spinner(spin: Duration) {
        loop {
            std::future::poll_fn(|cx| {
                STATE.with(|state| {
                    let mut state = state.borrow_mut();
                    if std::mem::take(&mut state.armed) {
                        Poll::Ready(())
                    } else {
                        state.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                })
            })
            .await;
            let mut last = Instant::now();
            let mut until = last + spin;
            let mut wanted = 0;
            loop {
                // Checks the driver without blocking, runs what it woke, comes back.
                tokio::task::yield_now().await;
                let back = Instant::now();
                if back - last > WORK_GAP {
                    until = back + spin;
                }
                std::thread::yield_now();
                let now = Instant::now();
                if now - back > CPU_WANTED {
                    wanted += 1;
                }
                if wanted == CPU_WANTED_TIMES || now >= until {
                    break;
                }
                last = now;
            }
            STATE.with(|state| state.borrow_mut().spun = true);
        }
    }
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

    /// CPU time (user + system, in clock ticks) of the thread `/proc/self/task/{tid}`.
    #[cfg(target_os = "linux")]
    fn cpu_ticks(tid: &str) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_spinning_worker_sleeps_once_its_spin_runs_out() {
        let workers =
            Workers::start_with(1, "w", WorkerOptions::default().spin(Duration::from_secs(3600))).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        workers.handle(0).unwrap().spawn(async move {
            let link = std::fs::read_link("/proc/thread-self").unwrap();
            let _ = tx.send(link.file_name().unwrap().to_string_lossy().into_owned());
        });
        let tid = rx.recv().unwrap();
        // Whatever spin that task started is over long before this.
        std::thread::sleep(Duration::from_millis(100));
        let before = cpu_ticks(&tid);
        std::thread::sleep(Duration::from_millis(800));
        let used = cpu_ticks(&tid) - before;
        // Spinning all along would be about 80 ticks (of 10 ms); a sleeping thread uses none.
        assert!(used <= 10, "the idle worker used {used} ticks of CPU in 800 ms");
    }

    #[test]
    fn a_spinning_worker_runs_timers_and_work_sent_from_other_threads() {
        // A spin far longer than the test: the worker never sleeps while it runs.
        let workers =
            Workers::start_with(1, "w", WorkerOptions::default().spin(Duration::from_secs(3600))).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..20u32 {
            let tx = tx.clone();
            workers.handle(0).unwrap().spawn(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let _ = tx.send(i);
            });
            assert_eq!(rx.recv().unwrap(), i);
        }
        // And a socket: a listener on the worker answers a client on this thread.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        workers.handle(0).unwrap().spawn(async move {
            use tokio::io::AsyncWriteExt;
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.write_all(b"hi").await.unwrap();
        });
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut client, &mut got).unwrap();
        assert_eq!(got, "hi");
    }
}
