//! The synchronisation primitives of the small concurrent cores (permits, breaker cell).
//!
//! Normally these are `std`'s. Built with `RUSTFLAGS="--cfg agentpool_loom"` they are loom's,
//! so `cargo xtask race` can model-check those cores exhaustively. A crate-specific cfg is used
//! rather than the global `cfg(loom)`, which would also switch third-party crates.

#[cfg(not(agentpool_loom))]
pub(crate) use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU32, Ordering},
};

#[cfg(agentpool_loom)]
pub(crate) use loom::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU32, Ordering},
};

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data consistent
/// at each step, so a panic elsewhere must not take the pool down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(not(agentpool_loom))]
    {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    #[cfg(agentpool_loom)]
    {
        m.lock().unwrap()
    }
}

/// [`lock`] for plain `std` mutexes (the parts of the crate that loom does not model).
pub(crate) fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
