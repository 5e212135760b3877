//! The claim's floor: where a worker's scan of fresh changes may start (pure bookkeeping; the
//! claim in the extension runs the scan).

use std::time::{Duration, Instant};

/// How far the floor trails the ids handed out: a change whose transaction commits later than
/// this after its capture is found by the next full scan instead (at most a poll_interval on).
const FLOOR_LAG: Duration = Duration::from_secs(1);

/// Where a worker's scan of fresh changes starts.
///
/// Until vacuum, the front of `fhir_outbox_pending_idx` keeps the dead entries of delivered
/// changes that no insert will clean up: a burst fills pages that new changes never reach again,
/// and a scan from the front steps over all of them (after a 100,000-row burst, 2.3–2.6 ms per
/// claim with nothing pending; after a day of bench runs, 400 pages and 3.2 ms; autovacuum comes
/// when a fifth of an outbox that keeps its history is dead: benches/README.md). Below the floor
/// every fresh change has been claimed, so the scan may start there. Two things can still put a fresh change
/// below it: a transaction that commits long after it took its id (its change was invisible
/// when the scan passed), and a lease given back (a release, a worker gone). So the floor trails
/// the ids handed out by FLOOR_LAG, this worker drops it to 0 when it gives a lease back, and
/// every poll_interval one claim scans from the front.
#[derive(Debug)]
pub struct Floor {
    id: i64,
    /// The ids handed out when each recent claim ran, oldest first.
    taken: std::collections::VecDeque<(Instant, i64)>,
    full_scan_at: Instant,
}

impl Default for Floor {
    fn default() -> Self {
        Floor {
            id: 0,
            taken: Default::default(),
            full_scan_at: Instant::now(),
        }
    }
}

impl Floor {
    /// Where this claim's scan starts.
    pub fn start(&mut self, now: Instant, full_scan_every: Duration) -> i64 {
        if now >= self.full_scan_at {
            self.full_scan_at = now + full_scan_every;
            0
        } else {
            self.id
        }
    }

    /// After a scan from `from` that found `first_fresh` as its lowest fresh change, with ids up to
    /// `taken` handed out.
    pub fn advance(
        &mut self,
        now: Instant,
        from: i64,
        first_fresh: Option<i64>,
        taken: Option<i64>,
    ) {
        if let Some(t) = taken {
            self.taken.push_back((now, t));
        }
        // The newest sample at least FLOOR_LAG old: every id up to it belongs to a transaction
        // that has had FLOOR_LAG to commit.
        let mut settled = None;
        while let Some(&(at, t)) = self.taken.front() {
            if now.duration_since(at) < FLOOR_LAG {
                break;
            }
            settled = Some(t);
            self.taken.pop_front();
        }
        if let Some(t) = settled {
            // Keep the sample: it stays the best bound until a newer one is old enough.
            self.taken.push_front((now - FLOOR_LAG, t));
        }
        let mut id = match settled {
            Some(t) => t + 1,
            None => from,
        };
        if let Some(f) = first_fresh {
            id = id.min(f);
        }
        self.id = id.max(from);
    }

    /// A lease was given back: the next scan starts from the front.
    pub fn reset(&mut self) {
        self.id = 0;
        self.full_scan_at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough that no periodic full scan falls inside a test (but the one at the end).
    const POLL: Duration = Duration::from_secs(60);

    fn floor_at(t0: Instant) -> Floor {
        Floor {
            id: 0,
            taken: Default::default(),
            full_scan_at: t0,
        }
    }

    #[test]
    fn the_floor_trails_the_ids_handed_out_and_never_passes_a_fresh_change() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut f = floor_at(t0);
        assert_eq!(f.start(t0, POLL), 0, "the first claim scans from the front");
        // Ids up to 150 handed out; 100 is the lowest fresh change.
        f.advance(t0, 0, Some(100), Some(150));
        assert_eq!(
            f.start(ms(200), POLL),
            0,
            "no id is a second old yet: nothing is skipped"
        );
        f.advance(ms(200), 0, Some(120), Some(300));
        // A second after the first claim, ids up to 150 have had time to commit; 400 is the
        // lowest fresh change now.
        assert_eq!(f.start(ms(1100), POLL), 0);
        f.advance(ms(1100), 0, Some(400), Some(500));
        assert_eq!(f.start(ms(1110), POLL), 151);
        // A fresh change below that bound holds the floor at it.
        f.advance(ms(1300), 151, Some(160), Some(600));
        assert_eq!(f.start(ms(1300), POLL), 160);
        // No fresh change left: the floor follows the ids handed out a second before (300).
        f.advance(ms(1500), 160, None, Some(700));
        assert_eq!(f.start(ms(1500), POLL), 301);
        // Every poll_interval one scan starts at the front (a lease another worker gave back,
        // a change of a transaction that committed late).
        assert_eq!(f.start(t0 + POLL, POLL), 0);
        assert_eq!(f.start(t0 + POLL + Duration::from_millis(1), POLL), 301);
    }

    #[test]
    fn a_lease_given_back_sends_the_next_scan_to_the_front() {
        let t0 = Instant::now();
        let mut f = floor_at(t0);
        f.start(t0, POLL);
        f.advance(t0, 0, None, Some(10));
        let t1 = t0 + Duration::from_millis(1500);
        f.start(t1, POLL);
        f.advance(t1, 0, None, Some(20));
        assert_eq!(f.start(t1 + Duration::from_millis(1), POLL), 11);
        f.reset();
        assert_eq!(f.start(Instant::now(), POLL), 0);
    }
}
