//! When a worker under load claims next (pure; the worker waits for the answer).
//!
//! A cycle costs a fixed part (the claim and settle transactions, waking the sending threads)
//! plus a part per resource. Waiting before the next claim saves only the fixed part, shared by
//! more rows; every change in the queue pays for the wait. So the next claim waits at most what
//! it would save: the fixed cost of one cycle (the ski-rental bound: neither the latency added
//! nor the overhead paid is more than twice the better of claiming now and waiting, whatever
//! arrives next).
//!
//! The fixed cost is learnt from the cycles themselves, as the intercept of a least-squares
//! line through recent (resources, duration) pairs, kept in decayed sums. Two earlier rules are
//! why: a fixed wait (`fhir_sync.linger`, 10 ms from a cycle's start) made every change of a
//! busy stream wait for it; waiting as long again as the last cycle took kept the worker busy
//! at most half the time, and once the work per row filled more than half of it (2,000 new
//! patients a second at ~200 µs each) every cycle waited for the full `linger`: p50 15 ms.
//! `linger` stays the ceiling, counted from the cycle's start.

use std::time::{Duration, Instant};

/// How much one observation's weight shrinks per later cycle: ~20 cycles of memory, so the
/// estimate follows a change of load or server within a fraction of a second under load.
const DECAY: f64 = 0.95;

/// Below this spread of batch sizes (their variance) the line's slope is noise, and the fixed
/// cost is bounded by the smallest recent cycle instead.
const MIN_SIZE_VARIANCE: f64 = 0.5;

/// What recent cycles cost, as decayed sums of (resources, duration in µs).
#[derive(Debug, Clone, Default)]
pub struct CycleCost {
    w: f64,
    n: f64,
    t: f64,
    nn: f64,
    nt: f64,
    /// The shortest recent cycle (µs), growing back by 3 % per cycle: an upper bound of the
    /// fixed cost that follows the load.
    shortest: Option<f64>,
}

impl CycleCost {
    /// Records a cycle that found `resources` resources and took `took`.
    pub fn observe(&mut self, took: Duration, resources: usize) {
        if resources == 0 {
            return;
        }
        let (n, t) = (resources as f64, took.as_secs_f64() * 1e6);
        self.w = self.w * DECAY + 1.0;
        self.n = self.n * DECAY + n;
        self.t = self.t * DECAY + t;
        self.nn = self.nn * DECAY + n * n;
        self.nt = self.nt * DECAY + n * t;
        self.shortest = Some(match self.shortest {
            Some(s) => t.min(s * 1.03),
            None => t,
        });
    }

    /// The estimated fixed cost of a cycle; None before any cycle was seen.
    pub fn fixed(&self) -> Option<Duration> {
        let shortest = self.shortest?;
        let mean_n = self.n / self.w;
        let var_n = self.nn / self.w - mean_n * mean_n;
        let fixed = if var_n < MIN_SIZE_VARIANCE {
            // Every cycle had about the same size: the intercept cannot be told from the slope.
            // Half the shortest cycle is within a factor of two of the truth when the fixed and
            // per-row parts are alike, and no wait is ever longer than a cycle.
            shortest / 2.0
        } else {
            // (A slope below zero, bigger cycles cheaper, is noise: then all is fixed.)
            let per_row = ((self.nt / self.w - mean_n * (self.t / self.w)) / var_n).max(0.0);
            self.t / self.w - per_row * mean_n
        };
        Some(Duration::from_secs_f64(fixed.clamp(0.0, shortest) / 1e6))
    }
}

/// When the next claim may start after a cycle that ran from `started` to `ended` and found
/// `resources` resources, given what cycles cost; None: at the next commit (a lone change is
/// never held back).
pub fn next_claim(
    started: Instant,
    ended: Instant,
    resources: usize,
    cost: &CycleCost,
    linger: Duration,
) -> Option<Instant> {
    if resources <= 1 || linger.is_zero() {
        return None;
    }
    let at = (ended + cost.fixed()?).min(started + linger);
    (at > ended).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(x: u64) -> Duration {
        Duration::from_micros(x)
    }

    /// Cycles that cost `fixed` + `per_row` per resource, sizes cycling through `sizes`.
    fn learnt(fixed: u64, per_row: u64, sizes: &[usize], cycles: usize) -> CycleCost {
        let mut c = CycleCost::default();
        for i in 0..cycles {
            let n = sizes[i % sizes.len()];
            c.observe(us(fixed + per_row * n as u64), n);
        }
        c
    }

    #[test]
    fn the_fixed_cost_is_learnt_from_cycles_of_different_sizes() {
        // (fixed µs, per row µs, sizes seen, what the estimate must be within 2 % of)
        let cases: [(u64, u64, &[usize], u64); 5] = [
            (1000, 200, &[3, 5, 8, 6, 4], 1000),  // new patients, single PUTs
            (1000, 20, &[40, 90, 60, 100], 1000), // Bundles: rows are cheap
            (300, 500, &[2, 3, 4], 300),          // a slow server: rows dominate
            (2000, 0, &[2, 7, 30], 2000),         // all fixed
            (0, 250, &[2, 9, 4], 0),              // nothing fixed: no wait
        ];
        for (fixed, per_row, sizes, want) in cases {
            let got = learnt(fixed, per_row, sizes, 60)
                .fixed()
                .unwrap()
                .as_micros() as f64;
            let tol = (want as f64 * 0.02).max(1.0);
            assert!(
                (got - want as f64).abs() <= tol,
                "fixed {fixed} per_row {per_row} {sizes:?}: {got}"
            );
        }
    }

    #[test]
    fn the_estimate_follows_a_change_of_load() {
        let mut c = learnt(1000, 200, &[3, 6, 9], 60);
        for i in 0..80 {
            let n = [3, 6, 9][i % 3];
            c.observe(us(4000 + 200 * n as u64), n);
        }
        let got = c.fixed().unwrap().as_micros() as i64;
        assert!((got - 4000).abs() < 200, "{got}");
    }

    #[test]
    fn without_a_spread_of_sizes_the_wait_is_bounded_by_the_shortest_cycle() {
        // All cycles of 5: half the shortest.
        let c = learnt(1000, 200, &[5], 30);
        assert_eq!(c.fixed(), Some(us(1000)));
        // Noise: an intercept larger than a cycle, or below zero, is clamped; a slope below zero
        // (bigger cycles cheaper) counts all as fixed, at most the shortest cycle.
        let noisy = |pairs: &[(u64, usize)]| {
            let mut c = CycleCost::default();
            for &(t, n) in pairs {
                c.observe(us(t), n);
            }
            c.fixed().unwrap()
        };
        let f = noisy(&[(900, 2), (5000, 3), (800, 4), (6000, 2), (700, 5)]);
        assert!(f <= us(700), "{f:?}");
        assert_eq!(
            noisy(&[(900, 2), (5000, 8), (950, 2), (5100, 8)]),
            Duration::ZERO
        );
        let f = noisy(&[(5000, 2), (900, 6), (5200, 2), (800, 7)]);
        assert_eq!(f, us(800));
    }

    #[test]
    fn the_next_claim_waits_one_fixed_cost_up_to_linger() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let cost = learnt(1000, 200, &[3, 5, 8], 30); // fixed cost 1 ms
        let cheap = learnt(100, 200, &[3, 5, 8], 30);
        // (cycle took, resources, what it costs, linger, wait after the cycle ended)
        let cases = [
            (ms(3), 10, &cost, ms(10), Some(ms(1))), // one fixed cost, not the cycle's length
            (ms(12), 40, &cost, ms(30), Some(ms(1))), // a long cycle waits no longer
            (ms(9), 40, &cost, ms(10), Some(ms(1))), // exactly reaches linger
            (ms(9) + us(500), 40, &cost, ms(10), Some(us(500))), // never later than linger after the start
            (ms(12), 90, &cost, ms(10), None), // a cycle longer than linger: claim at once
            (ms(2), 5, &cheap, ms(10), Some(us(100))), // little fixed cost, little wait
            (ms(2), 1, &cost, ms(10), None),   // a lone change: the next commit claims
            (ms(2), 0, &cost, ms(10), None),   // nothing found
            (ms(2), 40, &cost, ms(0), None),   // linger = 0: claim at every commit
        ];
        for (took, n, c, linger, wait) in cases {
            let got = next_claim(t0, t0 + took, n, c, linger).map(|at| at - (t0 + took));
            let close = match (got, wait) {
                (Some(g), Some(w)) => g.abs_diff(w) <= us(20),
                (g, w) => g == w,
            };
            assert!(
                close,
                "took {took:?}, {n} resources, linger {linger:?}: {got:?}, want {wait:?}"
            );
        }
        // No cycle seen yet: nothing to pace by.
        assert_eq!(
            next_claim(t0, t0 + ms(3), 10, &CycleCost::default(), ms(10)),
            None
        );
    }
}
