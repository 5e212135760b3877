//! The request-rate cap (fhir_sync.max_requests_per_second): a generic cell rate algorithm on
//! one atomic, the time the next request may start. Every worker of the cluster sends to the
//! one configured server, so the atomic lives in shared memory and the cap holds for all of
//! them together; the clock is CLOCK_MONOTONIC, which every process of the machine shares.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Requests are spaced a little wider than 1/cap: a request's arrival at the server jitters
/// with scheduling and the network, and the cap is a promise about what the server sees.
const MARGIN: f64 = 1.05;

/// How many requests may queue for a start time before the queue is cut short.
const HORIZON: u64 = 64;

/// A cap on requests per second, shared through `next`.
#[derive(Clone, Copy, Debug)]
pub struct Gate {
    next: &'static AtomicU64,
    interval_us: u64,
}

impl PartialEq for Gate {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.next, other.next) && self.interval_us == other.interval_us
    }
}

impl Gate {
    /// None when `per_second` is 0 (no cap).
    pub fn new(next: &'static AtomicU64, per_second: f64) -> Option<Gate> {
        (per_second > 0.0).then(|| Gate {
            next,
            interval_us: ((1e6 / per_second) * MARGIN).ceil() as u64,
        })
    }

    /// Blocks until this request may start.
    pub fn wait(&self) {
        let now = monotonic_us();
        let start = reserve(self.next, now, self.interval_us);
        if start > now {
            std::thread::sleep(Duration::from_micros(start - now));
        }
    }
}

/// Takes the first free start time at or after `now` and returns it; the next one is
/// `interval_us` later. Never lets idle time accumulate into a burst.
pub fn reserve(next: &AtomicU64, now: u64, interval_us: u64) -> u64 {
    let mut seen = next.load(Ordering::Acquire);
    loop {
        // Never further ahead than a queue of HORIZON requests: a reservation made under a
        // much lower cap (or a clock step) must not hold every worker back after a reload.
        let start = seen.max(now).min(now + HORIZON * interval_us);
        match next.compare_exchange_weak(
            seen,
            start + interval_us,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return start,
            Err(v) => seen = v,
        }
    }
}

/// Microseconds on CLOCK_MONOTONIC (shared by every process on the machine).
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_are_spaced_by_the_interval_and_idle_time_is_not_saved_up() {
        let next = AtomicU64::new(0);
        // Three requests at once: one now, then one per interval.
        assert_eq!(reserve(&next, 1_000, 100), 1_000);
        assert_eq!(reserve(&next, 1_000, 100), 1_100);
        assert_eq!(reserve(&next, 1_050, 100), 1_200);
        // After a long idle spell the next starts at once, and the one after waits again.
        assert_eq!(reserve(&next, 10_000, 100), 10_000);
        assert_eq!(reserve(&next, 10_000, 100), 10_100);
        // A start reserved hours ahead under another cap is pulled back to the horizon.
        next.store(u64::MAX / 2, Ordering::Relaxed);
        assert_eq!(reserve(&next, 20_000, 100), 20_000 + HORIZON * 100);
    }

    #[test]
    fn threads_sharing_a_gate_never_start_closer_than_the_interval() {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let gate = Gate::new(&NEXT, 200.0).unwrap();
        let starts = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10 {
                        gate.wait();
                        starts.lock().unwrap().push(monotonic_us());
                    }
                });
            }
        });
        let mut starts = starts.into_inner().unwrap();
        starts.sort();
        let span = starts.last().unwrap() - starts.first().unwrap();
        // 40 requests at 200/s (with the margin) take 39 intervals; one is allowed for the
        // first thread's own scheduling.
        assert!(span >= 38 * gate.interval_us, "{span} µs");
        assert!(Gate::new(&NEXT, 0.0).is_none());
    }
}
