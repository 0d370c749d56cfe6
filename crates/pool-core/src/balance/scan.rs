//! Linear scans shared by the strategies. Scans start at a given index and wrap, so that a
//! random or rotating start spreads ties and skips fairly.

/// Indexes `start, start + 1, …, n − 1, 0, …, start − 1`.
#[inline]
fn from(start: usize, n: usize) -> impl Iterator<Item = usize> {
    (start..n).chain(0..start)
}

/// The first index at or after `start` (wrapping) whose item is eligible.
#[inline]
pub(super) fn first_eligible<L>(items: &[L], start: usize, eligible: impl Fn(&L) -> bool) -> Option<usize> {
    from(start, items.len()).find(|&i| eligible(&items[i]))
}

/// The eligible item of least `cost`, the first one met from `start` on a tie.
#[inline]
pub(super) fn least<L>(
    items: &[L],
    start: usize,
    eligible: impl Fn(&L) -> bool,
    cost: impl Fn(&L) -> u64,
) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for i in from(start, items.len()) {
        let item = &items[i];
        if !eligible(item) {
            continue;
        }
        let c = cost(item);
        if best.is_none_or(|(_, b)| c < b) {
            if c == 0 {
                // Nothing can beat zero.
                return Some(i);
            }
            best = Some((i, c));
        }
    }
    best.map(|(i, _)| i)
}
