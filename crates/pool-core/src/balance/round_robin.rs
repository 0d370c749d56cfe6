//! Round robin: a shared cursor, skipping ineligible items.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::scan;

/// The first eligible item at or after `cursor % n`; the cursor advances by one per pick.
///
/// An item that follows a run of ineligible ones gets their share too: round robin is blind to
/// load by design, and the alternatives cost a second pass.
#[inline]
pub(super) fn pick<L>(cursor: &AtomicUsize, items: &[L], eligible: impl Fn(&L) -> bool) -> Option<usize> {
    // Relaxed: the cursor only spreads picks, it orders nothing.
    let start = cursor.fetch_add(1, Ordering::Relaxed) % items.len();
    scan::first_eligible(items, start, eligible)
}
