//! What to do about each outcome of a request: pure decisions, unit-tested without a server.
//!
//! The principle: a change spends an attempt only when *it* failed. An unreachable server, a
//! rejected credential or a throttle says nothing about the change, so the worker pauses and
//! the change keeps its attempts.

pub use crate::http::Transport;
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
    /// Another tracked row already maps to the resource's identifier (a duplicate MRN): sending
    /// would overwrite that row's resource. No request was made.
    IdentifierConflict,
    /// The server does not take this kind of write: a change of a resource in a `create_only`
    /// table (no request made), or a DELETE it answers 405 to.
    NotSendable,
}

impl Class {
    pub const ALL: [Class; 10] = [
        Class::Transient,
        Class::Unreachable,
        Class::Auth,
        Class::Conflict,
        Class::Rejected,
        Class::Unmappable,
        Class::Dependency,
        Class::Exhausted,
        Class::IdentifierConflict,
        Class::NotSendable,
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
            Class::IdentifierConflict => "identifier_conflict",
            Class::NotSendable => "not_sendable",
        }
    }

    /// Index into the shared-memory error counters (0 is "none").
    pub fn index(self) -> usize {
        Class::ALL.iter().position(|c| *c == self).unwrap_or(0) + 1
    }
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
            405 if is_delete => Verdict::DeadLetter(Class::NotSendable),
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

/// How long delivery stops when the server refuses the credentials (401/403): long enough not
/// to hammer an identity provider, short enough that a fixed secret is picked up without a reload.
pub const AUTH_PAUSE: Duration = Duration::from_secs(60);

/// How long delivery stops for any other pause the server asks for without saying how long.
pub const SHORT_PAUSE: Duration = Duration::from_millis(500);

/// How long delivery stops after a 429 without Retry-After.
pub const THROTTLE_PAUSE: Duration = Duration::from_secs(1);

/// The first and the longest interval between probes of an unreachable server (doubling).
pub const PROBE_FIRST: Duration = Duration::from_millis(500);
pub const PROBE_MAX: Duration = Duration::from_secs(30);

/// How long a worker naps when there is nothing it may do (no server configured, settings
/// refused, the extension not installed): only a reload or a CREATE EXTENSION changes that.
pub const IDLE_NAP: Duration = Duration::from_secs(5);

/// How often a worker waiting for CREATE EXTENSION or ALTER EXTENSION … UPDATE reads the catalog
/// again. The capture triggers of the old version still wake it at every commit; reading at each
/// one cost a planned catalog join per commit (~45 µs, 2,000 a second at 2,000 commits a second)
/// for as long as the update waits, while a change then reaches the server at most this late.
pub const EXTENSION_RECHECK: Duration = Duration::from_millis(250);

/// How long a worker waits after a cycle that failed (at least fhir_sync.poll_interval).
pub const FAILED_CYCLE_NAP: Duration = Duration::from_secs(1);

/// How often a problem that persists (the same step failing the same way) is logged again.
pub const FAILURE_RELOG: Duration = Duration::from_secs(60);

/// How long the worker trusts what it read of the catalog (tracked tables, the extension's
/// schema) before reading it again: a join per cycle would cost more than the delivery.
pub const CATALOG_TTL: Duration = Duration::from_secs(2);

/// Whether an answer says the server is struggling (or serialises writes): the worker halves
/// the requests it keeps in flight; any other answer lets it grow by one.
pub fn overloaded(t: &Transport) -> bool {
    matches!(t, Transport::Status(429 | 500 | 502 | 503 | 504))
}

/// How long a change that waits for a referenced resource (or a locked table) waits before it
/// is looked at again: a tenth of its age, between 200 ms and 30 s, so that a long wait costs
/// few claims.
pub fn dependency_wait(age_s: f64) -> Duration {
    Duration::from_millis((age_s * 100.0).clamp(200.0, 30_000.0) as u64)
}

/// How long to pause for a verdict of `Pause(class)`.
pub fn pause_length(class: Class) -> Duration {
    if class == Class::Auth {
        AUTH_PAUSE
    } else {
        SHORT_PAUSE
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

/// What a failed worker cycle means, told by the SQLSTATE of the PostgreSQL error behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trouble {
    /// An object is gone or changing (DROP EXTENSION, ALTER EXTENSION UPDATE, a library newer
    /// than the installed SQL, a tracked table or column dropped): wait for it.
    ExtensionChanging,
    /// Something held a lock, a statement ran out of time, or a transaction lost a
    /// serialization race: it passes.
    Busy,
    /// The worker's role lacks a grant.
    NoPrivilege,
    /// A value could not be handled (class 22).
    Data,
    Other,
}

impl Trouble {
    /// 55000 is what fhir_sync itself raises for its own objects altered (error.rs `Broken`).
    pub fn of(sqlstate: &str) -> Trouble {
        match sqlstate {
            "42P01" | "42883" | "42703" | "3F000" | "42704" | "55000" => Trouble::ExtensionChanging,
            "55P03" | "57014" | "40001" | "40P01" => Trouble::Busy,
            "42501" => Trouble::NoPrivilege,
            s if s.starts_with("22") => Trouble::Data,
            _ => Trouble::Other,
        }
    }

    /// What the log line adds: what it means, and what to do where someone must act.
    pub fn explanation(self) -> &'static str {
        match self {
            Trouble::ExtensionChanging => "; an object is missing or changing (DROP EXTENSION, ALTER EXTENSION UPDATE, a tracked table or column dropped); if it persists after installing a new fhir_sync, run ALTER EXTENSION fhir_sync UPDATE",
            Trouble::Busy => "; something held a lock or a statement ran out of time, retried",
            Trouble::NoPrivilege => "; the worker's role lacks a grant: SELECT fhir_sync_grant_worker('<fhir_sync.username>')",
            Trouble::Data | Trouble::Other => "",
        }
    }

    /// Whether it is a problem for a DBA (WARNING) or one that passes by itself (LOG).
    pub fn needs_a_dba(self) -> bool {
        !matches!(self, Trouble::Busy)
    }
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
    fn waits_grow_with_age_within_bounds() {
        assert_eq!(dependency_wait(0.0), Duration::from_millis(200));
        assert_eq!(dependency_wait(10.0), Duration::from_secs(1));
        assert_eq!(dependency_wait(1e9), Duration::from_secs(30));
        assert!(overloaded(&Transport::Status(503)) && !overloaded(&Transport::Status(422)));
        assert_eq!(pause_length(Class::Auth), AUTH_PAUSE);
        assert_eq!(pause_length(Class::Unreachable), SHORT_PAUSE);
    }

    #[test]
    fn a_failed_cycle_is_told_by_its_sqlstate() {
        let cases = [
            ("42P01", Trouble::ExtensionChanging), // undefined_table: DROP EXTENSION
            ("42883", Trouble::ExtensionChanging), // undefined_function: SQL older than the library
            ("55000", Trouble::ExtensionChanging),
            ("55P03", Trouble::Busy), // lock_not_available (fhir_sync.lock_timeout)
            ("57014", Trouble::Busy), // query_canceled (fhir_sync.statement_timeout)
            ("40001", Trouble::Busy),
            ("40P01", Trouble::Busy),
            ("42501", Trouble::NoPrivilege),
            ("22P02", Trouble::Data),
            ("XX000", Trouble::Other),
        ];
        for (state, t) in cases {
            assert_eq!(Trouble::of(state), t, "{state}");
        }
        assert!(!Trouble::Busy.needs_a_dba() && Trouble::NoPrivilege.needs_a_dba());
    }

    #[test]
    fn retries_run_out_at_max_retries() {
        assert!(!exhausted(4, 5));
        assert!(exhausted(5, 5));
        assert!(exhausted(1, 0));
    }
}
