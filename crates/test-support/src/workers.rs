//! Worker threads as a thread-per-core proxy runs them, for tests of connection placement:
//! each thread runs a single-threaded runtime (I/O and time enabled) and is marked as worker
//! `i` ([`pool_api::set_worker_index`]).

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Starts `n` worker threads; returns their runtimes' handles and, for each, what stops it:
/// worker `i` ends (its runtime and every task on it dropped) when `stops[i]` is dropped or
/// sent to.
pub fn worker_runtimes(n: usize) -> (Vec<Handle>, Vec<oneshot::Sender<()>>) {
    let (mut handles, mut stops) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a worker's runtime");
            pool_api::set_worker_index(Some(i));
            tx.send(runtime.handle().clone()).expect("the caller waits for the handle");
            let _ = runtime.block_on(stopped);
        });
        handles.push(rx.recv().expect("the worker thread started"));
        stops.push(stop);
    }
    (handles, stops)
}
