//! The atomics of the activity protocol ([`activity`](crate::activity)).
//!
//! Normally `std`'s. Built with `RUSTFLAGS="--cfg agentpool_loom"` they are loom's, so
//! `cargo xtask race` model-checks the protocol. The crate-specific cfg leaves third-party
//! crates alone (the global `cfg(loom)` would switch tokio too).

#[cfg(not(agentpool_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

#[cfg(agentpool_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Marks a `SeqCst` write followed by a `SeqCst` read of another location, where correctness
/// rests on both being in the single total order of `SeqCst` operations (a Dekker pair).
///
/// Normally the language guarantees that order and this is nothing. Loom models `SeqCst`
/// accesses as acquire/release only but does model `SeqCst` fences, so under loom this is a
/// fence and the model sees the ordering the real program has.
#[inline(always)]
pub(crate) fn seq_cst_pair() {
    #[cfg(agentpool_loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}
