//! Counting guards for the server's limits: a count per key (client address, client
//! certificate) with a ceiling, each unit held by a guard that gives it back when dropped, so no
//! path — an error, a dropped future, a panic — can leak a count.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// A count with a ceiling.
#[derive(Debug)]
pub(crate) struct Limit {
    max: usize,
    count: AtomicUsize,
}

impl Limit {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, count: AtomicUsize::new(0) })
    }

    /// One unit, or `None` at the ceiling.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<LimitGuard> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| LimitGuard(self.clone()))
    }

    pub(crate) fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// One unit of a [`Limit`].
#[derive(Debug)]
pub(crate) struct LimitGuard(Arc<Limit>);

impl Drop for LimitGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A count per key with one ceiling for every key; keys at zero are forgotten. The map's lock is
/// held for one insert or decrement, never across an `.await`.
#[derive(Debug)]
pub(crate) struct KeyedLimit<K> {
    max: usize,
    counts: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, counts: Mutex::new(HashMap::new()) })
    }

    /// One unit for `key`, or `None` when the key is at the ceiling.
    pub(crate) fn try_acquire(self: &Arc<Self>, key: K) -> Option<KeyedGuard<K>> {
        let mut counts = self.counts.lock();
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(KeyedGuard { owner: self.clone(), key })
    }

    #[cfg(test)]
    fn count(&self, key: &K) -> usize {
        self.counts.lock().get(key).copied().unwrap_or(0)
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.counts.lock().len()
    }
}

/// One unit of a [`KeyedLimit`] for one key.
#[derive(Debug)]
pub(crate) struct KeyedGuard<K: Hash + Eq> {
    owner: Arc<KeyedLimit<K>>,
    key: K,
}

impl<K: Hash + Eq> Drop for KeyedGuard<K> {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock();
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_refuses_at_its_ceiling_and_guards_give_back() {
        let limit = Limit::new(2);
        let a = limit.try_acquire().unwrap();
        let b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        drop(a);
        let c = limit.try_acquire().unwrap();
        assert_eq!(limit.current(), 2);
        drop((b, c));
        assert_eq!(limit.current(), 0);
    }

    #[test]
    fn keyed_limits_count_each_key_and_forget_keys_at_zero() {
        let limit = KeyedLimit::new(2);
        let a1 = limit.try_acquire("a").unwrap();
        let a2 = limit.try_acquire("a").unwrap();
        assert!(limit.try_acquire("a").is_none());
        let b1 = limit.try_acquire("b").unwrap();
        assert_eq!((limit.count(&"a"), limit.count(&"b")), (2, 1));
        drop((a1, a2, b1));
        assert_eq!(limit.keys(), 0);
        assert!(limit.try_acquire("a").is_some());
    }
}
