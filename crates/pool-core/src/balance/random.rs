//! Uniform and health-weighted random choice.

use super::{Load, rng::Rng, scan};

/// A uniform draw; an ineligible draw moves forward to the next eligible item.
#[inline]
pub(super) fn uniform<L>(rng: &Rng, items: &[L], eligible: impl Fn(&L) -> bool) -> Option<usize> {
    scan::first_eligible(items, rng.below(items.len()), eligible)
}

/// A health score as a weight: clamped to `[0, 1]`, NaN as 0.
#[inline]
fn weight<L: Load>(item: &L) -> f64 {
    let h = item.health_score();
    // `h > 0.0` is false for NaN.
    if h > 0.0 { h.min(1.0) } else { 0.0 }
}

/// Random with probability proportional to `health_score` among eligible items; uniform among
/// them if every weight is zero. Two passes over the items, no allocation.
pub(super) fn weighted_by_health<L: Load>(
    rng: &Rng,
    items: &[L],
    eligible: impl Fn(&L) -> bool,
) -> Option<usize> {
    let mut total = 0.0;
    let mut count = 0usize;
    let mut last_weighted = None;
    for (i, item) in items.iter().enumerate() {
        if eligible(item) {
            count += 1;
            let w = weight(item);
            if w > 0.0 {
                total += w;
                last_weighted = Some(i);
            }
        }
    }
    if count == 0 {
        return None;
    }
    let Some(last_weighted) = last_weighted else {
        let k = rng.below(count);
        return items.iter().enumerate().filter(|(_, item)| eligible(item)).nth(k).map(|(i, _)| i);
    };
    let mut r = rng.unit_f64() * total;
    for (i, item) in items.iter().enumerate() {
        if eligible(item) {
            let w = weight(item);
            if w > 0.0 && r < w {
                return Some(i);
            }
            r -= w;
        }
    }
    // Rounding left `r` just above the last weight: that item is the right answer.
    Some(last_weighted)
}
