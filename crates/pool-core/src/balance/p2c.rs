//! Power of two choices: compare two distinct random items, take the cheaper.

use super::{rng::Rng, scan};

/// P2C by `cost`. If only one of the two draws is eligible it wins; if neither is, the cheapest
/// eligible item overall (a scan starting at the first draw), so that a list with few eligible
/// items still yields one.
#[inline]
pub(super) fn pick<L>(
    rng: &Rng,
    items: &[L],
    eligible: impl Fn(&L) -> bool,
    cost: impl Fn(&L) -> u64,
) -> Option<usize> {
    let n = items.len();
    if n == 1 {
        return eligible(&items[0]).then_some(0);
    }
    let (a, b) = rng.two_distinct(n);
    match (eligible(&items[a]), eligible(&items[b])) {
        // `a` is as random as `b`, so keeping `a` on a tie is a fair coin.
        (true, true) => Some(if cost(&items[b]) < cost(&items[a]) { b } else { a }),
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => scan::least(items, a, eligible, cost),
    }
}
