//! When a worker under load claims next (pure; the worker waits for the answer).
//!
//! A cycle's fixed cost (the claim and settle transactions, waking the sending threads) is paid
//! per cycle, so under load the next claim waits for more changes to gather. A fixed wait
//! (`fhir_sync.linger`, 10 ms from the start of the cycle) made every change of a busy stream
//! wait for it, though a cycle of a few rows took a millisecond: at 2,000 rows/s commit → arrival
//! p99 was 10 ms. The wait now follows what a cycle costs: the next claim starts no earlier than
//! as long again after the cycle ended as the cycle took, so the worker is busy at most half the
//! time while it waits, a cheap cycle holds the next changes back little, and a costly one
//! gathers enough to amortise it. `linger` stays the ceiling, counted from the cycle's start.

use std::time::{Duration, Instant};

/// When the next claim may start after a cycle that ran from `started` to `ended` and found
/// `resources` resources; None: at the next commit (a lone change is never held back).
pub fn next_claim(
    started: Instant,
    ended: Instant,
    resources: usize,
    linger: Duration,
) -> Option<Instant> {
    if resources <= 1 || linger.is_zero() {
        return None;
    }
    let took = ended.saturating_duration_since(started);
    let at = (ended + took).min(started + linger);
    (at > ended).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_claim_waits_as_long_as_the_cycle_took_up_to_linger() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        // (cycle took, resources, linger, wait after the cycle ended)
        let cases = [
            (ms(1), 5, ms(10), Some(ms(1))), // a cheap cycle holds the next changes back little
            (ms(3), 40, ms(10), Some(ms(3))), // a costlier one gathers more
            (ms(6), 40, ms(10), Some(ms(4))), // never later than linger after the cycle began
            (ms(12), 90, ms(10), None),      // a cycle longer than linger: claim at once
            (ms(2), 1, ms(10), None),        // a lone change: the next commit claims
            (ms(2), 0, ms(10), None),        // nothing found
            (ms(2), 40, ms(0), None),        // linger = 0: claim at every commit
            (ms(0), 40, ms(10), None),       // a cycle that took no time waits for nothing
        ];
        for (took, n, linger, wait) in cases {
            let got = next_claim(t0, t0 + took, n, linger).map(|at| at - (t0 + took));
            assert_eq!(got, wait, "took {took:?}, {n} resources, linger {linger:?}");
        }
    }
}
