//! What to do about each outcome of a request: pure decisions, unit-tested without a server.
//!
//! The principle: a change spends an attempt only when *it* failed. An unreachable server, a
//! rejected credential or a throttle says nothing about the change, so the worker pauses and
//! the change keeps its attempts.

use std::time::Duration;

/// How a delivery failed. The names are what DBAs see in fhir_outbox.error_class,
/// fhir_dlq.error_class and the metrics labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Worth retrying: timeout, reset, 408, 429, 5xx.
    Transient,
    /// The server cannot be reached at all: pause and probe, spend no attempts.
    Unreachable,
    /// 401/403: a configuration problem; pause, spend no attempts, dead-letter nothing.
    Auth,
    /// 409: the server lost a race between concurrent writes; re-send.
    Conflict,
    /// The server rejected the resource (400, 404, 405, 410, 412, 413, 415, 422, 3xx).
    Rejected,
    /// The row cannot be turned into a resource; no request was made.
    Unmappable,
    /// The resource waited too long for the Patient or Encounter it references.
    Dependency,
    /// Transient failures went on past fhir_sync.max_retries.
    Exhausted,
}

impl Class {
    pub const ALL: [Class; 8] = [
        Class::Transient,
        Class::Unreachable,
        Class::Auth,
        Class::Conflict,
        Class::Rejected,
        Class::Unmappable,
        Class::Dependency,
        Class::Exhausted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Transient => "transient",
            Class::Unreachable => "unreachable",
            Class::Auth => "auth",
            Class::Conflict => "conflict",
            Class::Rejected => "rejected",
            Class::Unmappable => "unmappable",
            Class::Dependency => "dependency",
            Class::Exhausted => "exhausted",
        }
    }

    /// Index into the shared-memory error counters (0 is "none").
    pub fn index(self) -> usize {
        Class::ALL.iter().position(|c| *c == self).unwrap_or(0) + 1
    }
}

/// The transport-level result of one request, as far as policy cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The server answered with this status.
    Status(u16),
    /// No connection could be made (refused, no route, DNS, TLS handshake).
    ConnectFailed,
    /// Connected, but the exchange broke (timeout, reset, malformed response).
    Broken,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry(Class),
    /// Stop sending for a while; the change is released without spending an attempt.
    Pause(Class),
    DeadLetter(Class),
}

/// Classifies one response. `is_delete` because a DELETE of something already gone succeeded.
pub fn classify(t: &Transport, is_delete: bool) -> Verdict {
    match t {
        Transport::ConnectFailed => Verdict::Pause(Class::Unreachable),
        Transport::Broken => Verdict::Retry(Class::Transient),
        Transport::Status(s) => match *s {
            200..=299 => Verdict::Delivered,
            404 | 410 if is_delete => Verdict::Delivered,
            401 | 403 => Verdict::Pause(Class::Auth),
            408 | 429 | 500 | 502 | 503 | 504 => Verdict::Retry(Class::Transient),
            409 => Verdict::Retry(Class::Conflict),
            300..=499 => Verdict::DeadLetter(Class::Rejected),
            _ => Verdict::Retry(Class::Transient),
        },
    }
}

/// Classifies the outcome of a request. An update conditional on a version (If-Match) that
/// still fails its precondition after the re-reads in send.rs lost a race with another writer:
/// it is a conflict to retry, not a rejection of the resource (a 412 on a conditional update
/// by identifier means several resources match: that is a rejection).
pub fn classify_request(t: &Transport, is_delete: bool, versioned: bool) -> Verdict {
    match t {
        Transport::Status(412) if versioned => Verdict::Retry(Class::Conflict),
        _ => classify(t, is_delete),
    }
}

/// How long before attempt `attempts + 1`: exponential from 1 s, capped at 5 minutes, with
/// ±25 % jitter so that changes failing together do not come back together; never sooner than
/// the server's Retry-After.
pub fn backoff(attempts: i32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let exp = attempts.clamp(1, 20) - 1;
    let base = (1u64 << exp.min(9)) as f64; // 1, 2, 4 … 512 s before the cap
    let capped = base.min(300.0);
    let jittered = capped * (0.75 + 0.5 * jitter.clamp(0.0, 1.0));
    let d = Duration::from_secs_f64(jittered);
    match retry_after {
        Some(r) if r > d => r,
        _ => d,
    }
}

/// How many immediate re-sends a 409 gets before it is treated as a transient failure.
pub const CONFLICT_RESENDS: u32 = 3;

/// Parses Retry-After: delta-seconds or an HTTP-date, relative to `now`. Bounded to one hour so
/// that a hostile or broken header cannot park delivery for days.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value.trim();
    let secs = if let Ok(n) = v.parse::<u64>() {
        n as f64
    } else {
        let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        (when.with_timezone(&chrono::Utc) - now)
            .num_milliseconds()
            .max(0) as f64
            / 1000.0
    };
    Some(Duration::from_secs_f64(secs.min(3600.0)))
}

/// Whether a change that failed `attempts` times (this failure included) is out of retries.
pub fn exhausted(attempts: i32, max_retries: i32) -> bool {
    attempts >= max_retries.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_the_issue_lists_them() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert_eq!(
                classify(&Transport::Status(s), false),
                Verdict::Retry(Class::Transient),
                "{s}"
            );
        }
        for s in [400, 404, 405, 410, 412, 413, 415, 422, 301, 302] {
            assert_eq!(
                classify(&Transport::Status(s), false),
                Verdict::DeadLetter(Class::Rejected),
                "{s}"
            );
        }
        assert_eq!(
            classify(&Transport::Status(401), false),
            Verdict::Pause(Class::Auth)
        );
        assert_eq!(
            classify(&Transport::Status(403), false),
            Verdict::Pause(Class::Auth)
        );
        assert_eq!(
            classify(&Transport::Status(409), false),
            Verdict::Retry(Class::Conflict)
        );
        assert_eq!(classify(&Transport::Status(201), false), Verdict::Delivered);
        assert_eq!(
            classify(&Transport::ConnectFailed, false),
            Verdict::Pause(Class::Unreachable)
        );
        assert_eq!(
            classify(&Transport::Broken, false),
            Verdict::Retry(Class::Transient)
        );
    }

    #[test]
    fn a_lost_version_precondition_is_a_conflict_but_an_ambiguous_identifier_is_a_rejection() {
        let s412 = Transport::Status(412);
        assert_eq!(
            classify_request(&s412, false, true),
            Verdict::Retry(Class::Conflict)
        );
        assert_eq!(
            classify_request(&s412, false, false),
            Verdict::DeadLetter(Class::Rejected)
        );
        assert_eq!(
            classify_request(&Transport::Status(422), false, true),
            Verdict::DeadLetter(Class::Rejected)
        );
        assert_eq!(
            classify_request(&Transport::Status(200), false, true),
            Verdict::Delivered
        );
    }

    #[test]
    fn deleting_what_is_already_gone_is_success() {
        assert_eq!(classify(&Transport::Status(404), true), Verdict::Delivered);
        assert_eq!(classify(&Transport::Status(410), true), Verdict::Delivered);
        assert_eq!(
            classify(&Transport::Status(422), true),
            Verdict::DeadLetter(Class::Rejected)
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_respects_retry_after() {
        let mid = |a| backoff(a, None, 0.5);
        assert_eq!(mid(1), Duration::from_secs(1));
        assert_eq!(mid(2), Duration::from_secs(2));
        assert_eq!(mid(4), Duration::from_secs(8));
        assert_eq!(mid(30), Duration::from_secs(300));
        assert!(backoff(1, None, 0.0) >= Duration::from_millis(750));
        assert!(backoff(1, None, 1.0) <= Duration::from_millis(1250));
        assert_eq!(
            backoff(1, Some(Duration::from_secs(30)), 0.5),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn retry_after_in_seconds_or_http_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:00:20 GMT", now),
            Some(Duration::from_secs(20))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(
            parse_retry_after("999999", now),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn retries_run_out_at_max_retries() {
        assert!(!exhausted(4, 5));
        assert!(exhausted(5, 5));
        assert!(exhausted(1, 0));
    }
}
