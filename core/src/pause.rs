//! The worker's pause: stop sending while the server is unreachable, refuses the credentials or
//! asks to slow down; probe an unreachable server at doubling intervals. Pure state, driven by
//! the worker with the current time.

use crate::policy::{self, Class};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pause {
    pub class: Class,
    pub until: Instant,
    /// The next probe interval of an unreachable server.
    backoff: Duration,
}

/// What the worker should do about its pause at the start of a cycle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step {
    /// Not paused (or a throttle or credential pause ended): deliver.
    Deliver,
    /// Still paused: sleep this long, at most.
    Sleep(Duration),
    /// An unreachable server's pause ended: probe it before delivering.
    Probe,
}

#[derive(Debug, Default)]
pub struct PauseState {
    current: Option<Pause>,
}

impl PauseState {
    pub fn current(&self) -> Option<&Pause> {
        self.current.as_ref()
    }

    pub fn is_paused(&self) -> bool {
        self.current.is_some()
    }

    /// Where the cycle stands. A throttle or credential pause that ended is lifted here (a new
    /// refusal pauses again); an unreachable server is lifted only by a probe that reaches it.
    pub fn step(&mut self, now: Instant) -> Step {
        match self.current {
            None => Step::Deliver,
            Some(p) if now < p.until => Step::Sleep(p.until - now),
            Some(p) if p.class == Class::Unreachable => Step::Probe,
            Some(_) => {
                self.current = None;
                Step::Deliver
            }
        }
    }

    /// Pauses for `wait`. Returns true when the reason is new (worth a line in the log).
    pub fn pause(&mut self, class: Class, wait: Duration, now: Instant) -> bool {
        let new = self.current.map(|p| p.class) != Some(class);
        let backoff = self.current.map_or(policy::PROBE_FIRST, |p| p.backoff);
        self.current = Some(Pause {
            class,
            until: now + wait,
            backoff,
        });
        new
    }

    /// The probe found the server still unreachable: wait twice as long before the next one.
    pub fn probe_failed(&mut self, now: Instant) {
        if let Some(p) = &mut self.current {
            p.backoff = (p.backoff * 2).min(policy::PROBE_MAX);
            p.until = now + p.backoff;
        }
    }

    /// Resumes delivery (the server answered, or new settings deserve a try).
    pub fn lift(&mut self) -> bool {
        self.current.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_server_is_probed_at_doubling_intervals_until_it_answers() {
        let t0 = Instant::now();
        let mut p = PauseState::default();
        assert_eq!(p.step(t0), Step::Deliver);
        assert!(
            p.pause(Class::Unreachable, policy::SHORT_PAUSE, t0),
            "a new reason"
        );
        assert!(
            !p.pause(Class::Unreachable, policy::SHORT_PAUSE, t0),
            "the same reason"
        );
        assert_eq!(p.step(t0), Step::Sleep(policy::SHORT_PAUSE));
        let mut t = t0 + policy::SHORT_PAUSE;
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert_eq!(p.step(t), Step::Probe);
            p.probe_failed(t);
            let until = p.current().unwrap().until;
            waits.push((until - t).as_millis());
            t = until;
        }
        assert_eq!(waits, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert!(p.lift());
        assert_eq!(p.step(t), Step::Deliver);
    }

    #[test]
    fn a_throttle_or_credential_pause_ends_by_itself() {
        let t0 = Instant::now();
        for class in [Class::Transient, Class::Auth] {
            let mut p = PauseState::default();
            p.pause(class, policy::pause_length(class), t0);
            let wait = policy::pause_length(class);
            assert_eq!(p.step(t0), Step::Sleep(wait));
            assert_eq!(p.step(t0 + wait), Step::Deliver, "{class:?}");
            assert!(!p.is_paused());
        }
    }
}
