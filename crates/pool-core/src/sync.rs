//! The synchronisation primitives of the small concurrent cores (permits, permit waiters,
//! breaker cell, affinity table).
//!
//! Normally these are `std`'s. Built with `RUSTFLAGS="--cfg agentpool_loom"` they are loom's,
//! so `cargo xtask race` can model-check those cores exhaustively. A crate-specific cfg is used
//! rather than the global `cfg(loom)`, which would also switch third-party crates.

#[cfg(not(agentpool_loom))]
pub(crate) use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence},
};

#[cfg(agentpool_loom)]
pub(crate) use loom::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence},
};

/// Marks a `SeqCst` read-modify-write followed by a `SeqCst` access to another location,
/// where correctness rests on both being in the single total order of `SeqCst` operations.
///
/// Normally the language guarantees that order and this is nothing at all. Loom models `SeqCst`
/// accesses as acquire/release only, but does model `SeqCst` fences, so under loom this is a
/// fence: the model then sees the ordering the real program has. Used where a fence in the
/// real program would cost the send path (see `crate::waiters`).
#[inline(always)]
pub(crate) fn seq_cst_pair() {
    #[cfg(agentpool_loom)]
    fence(Ordering::SeqCst);
}

/// A concurrent map with just what the affinity table needs: a `DashMap` normally, a
/// mutex-guarded `HashMap` under loom (which cannot see inside `DashMap`'s locks).
pub(crate) struct PinMap<K, V> {
    #[cfg(not(agentpool_loom))]
    inner: dashmap::DashMap<K, V, foldhash::fast::RandomState>,
    #[cfg(agentpool_loom)]
    inner: Mutex<std::collections::HashMap<K, V>>,
}

impl<K: Eq + std::hash::Hash, V> PinMap<K, V> {
    pub(crate) fn new() -> Self {
        #[cfg(not(agentpool_loom))]
        {
            Self { inner: dashmap::DashMap::with_hasher(foldhash::fast::RandomState::default()) }
        }
        #[cfg(agentpool_loom)]
        {
            Self { inner: Mutex::new(std::collections::HashMap::new()) }
        }
    }

    /// Runs `f` on the value of `key`, under the map's read lock.
    pub(crate) fn read<Q, R>(&self, key: &Q, f: impl FnOnce(&V) -> R) -> Option<R>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        #[cfg(not(agentpool_loom))]
        {
            self.inner.get(key).map(|v| f(&v))
        }
        #[cfg(agentpool_loom)]
        {
            lock(&self.inner).get(key).map(f)
        }
    }

    /// True if `key` has a value.
    pub(crate) fn contains<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        self.read(key, |_| ()).is_some()
    }

    /// Replaces the value of an existing key (true), or inserts a new one if `admit` allows it
    /// (its answer), atomically with respect to other writers of that key.
    pub(crate) fn upsert(&self, key: K, value: V, admit: impl FnOnce() -> bool) -> bool {
        #[cfg(not(agentpool_loom))]
        {
            match self.inner.entry(key) {
                dashmap::Entry::Occupied(mut o) => {
                    o.insert(value);
                    true
                }
                dashmap::Entry::Vacant(v) => {
                    let admitted = admit();
                    if admitted {
                        v.insert(value);
                    }
                    admitted
                }
            }
        }
        #[cfg(agentpool_loom)]
        {
            let mut map = lock(&self.inner);
            if let Some(slot) = map.get_mut(&key) {
                *slot = value;
                return true;
            }
            let admitted = admit();
            if admitted {
                map.insert(key, value);
            }
            admitted
        }
    }

    /// Removes `key`; true if it was there.
    pub(crate) fn remove<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        #[cfg(not(agentpool_loom))]
        {
            self.inner.remove(key).is_some()
        }
        #[cfg(agentpool_loom)]
        {
            lock(&self.inner).remove(key).is_some()
        }
    }

    /// Keeps the values for which `keep` is true; returns how many were removed.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let mut removed = 0;
        #[cfg(not(agentpool_loom))]
        self.inner.retain(|_, v| {
            let k = keep(v);
            removed += usize::from(!k);
            k
        });
        #[cfg(agentpool_loom)]
        lock(&self.inner).retain(|_, v| {
            let k = keep(v);
            removed += usize::from(!k);
            k
        });
        removed
    }
}

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
