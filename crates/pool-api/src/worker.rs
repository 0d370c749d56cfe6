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
}
