//! The verdict on one tier of a batch: what each resource's request (or the lack of one) means
//! for its changes, and what the answers mean for the worker — its counters, a pause, how many
//! requests it keeps in flight. A pure function of the plan, the answers and the change's past;
//! the worker applies the result in one place (`worker/apply.rs` in the extension).

use crate::http::{Response, Transport};
use crate::policy::{self, Class, Verdict};
use crate::response::{describe_failure, operation_outcome, resource_id};
use serde_json::Value;
use std::time::Duration;

/// What the map step planned for a resource, as far as the verdict cares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Planned<'a> {
    /// The row is gone and nothing of it is on the server: nothing to send.
    AlreadyGone,
    /// A referenced resource is not on the server yet, or the row could not be read in time.
    Wait(&'a str),
    /// The row cannot be turned into a resource: no request.
    Fail(Class, &'a str),
    /// A PUT; `versioned` when it is conditional on the version last written (If-Match).
    Put {
        versioned: bool,
    },
    Delete,
}

/// One resource of the tier.
#[derive(Clone, Copy, Debug)]
pub struct Case<'a> {
    pub planned: Planned<'a>,
    /// Attempts its changes have spent so far.
    pub attempts: i32,
    /// Seconds since its oldest pending change was captured.
    pub age_s: f64,
    /// How many outbox rows (changes) it carries.
    pub changes: usize,
    /// The server's answer; None when the request was not sent (the worker stopped sending).
    pub response: Option<&'a Response>,
}

/// What becomes of a resource's changes.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// On the server as planned (or nothing to do): the id and version the server gave it.
    Delivered {
        fhir_id: Option<String>,
        version: Option<String>,
        deleted: bool,
    },
    /// Looked at again after `delay`, spending no attempt.
    Wait { delay: Duration, reason: String },
    /// Sent again after `delay`; the failure spends an attempt.
    Retry {
        delay: Duration,
        class: Class,
        error: String,
        http_status: Option<i32>,
    },
    /// Moved to the dead-letter table.
    DeadLetter {
        class: Class,
        error: String,
        http_status: Option<i32>,
        outcome: Option<Value>,
        /// Whether a request was made (it spends an attempt; a mapping failure does not).
        attempted: bool,
    },
    /// Handed back untouched: not sent, or sent while the server asked for a pause.
    Release,
}

/// How many requests the worker keeps in flight after this tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrency {
    /// The server is struggling: halve (at least one).
    Halve,
    /// Clean answers: one more (up to fhir_sync.max_in_flight).
    Grow,
    /// Nothing was answered.
    Keep,
}

/// What the tier means for the worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Effects {
    /// Changes delivered by a request (the `processed_total` counter).
    pub processed: u64,
    /// Resources whose delivery failed this time (the `failed_total` counter).
    pub failed: u64,
    /// Changes dead-lettered (the `dead_lettered_total` counter).
    pub dead_lettered: u64,
    /// The class of each answer that was not a success, in order (the call-error counters; the
    /// last is the worker's `last_error_class`).
    pub call_errors: Vec<Class>,
    /// Whether any request succeeded (the worker's `last_success_at`).
    pub succeeded: bool,
    /// Stop sending for this long, for this reason.
    pub pause: Option<(Class, Duration)>,
    pub concurrency: Concurrency,
}

/// The judgement of a tier: an outcome per case, in order, and the effects.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub outcomes: Vec<Outcome>,
    pub effects: Effects,
}

/// Judges a tier. `jitter` gives numbers in [0, 1) to spread retries; `now` dates a Retry-After
/// given as an HTTP date.
pub fn judge(
    cases: &[Case],
    max_retries: i32,
    jitter: &mut dyn FnMut() -> f64,
    now: chrono::DateTime<chrono::Utc>,
) -> Judgement {
    let mut fx = Effects {
        processed: 0,
        failed: 0,
        dead_lettered: 0,
        call_errors: Vec::new(),
        succeeded: false,
        pause: None,
        concurrency: Concurrency::Keep,
    };
    let outcomes: Vec<Outcome> = cases
        .iter()
        .map(|c| one(c, max_retries, jitter, now, &mut fx))
        .collect();
    for (c, o) in cases.iter().zip(&outcomes) {
        if let Outcome::DeadLetter { .. } = o {
            fx.dead_lettered += c.changes as u64;
        }
    }
    let answers: Vec<&Response> = cases.iter().filter_map(|c| c.response).collect();
    fx.concurrency = if answers.iter().any(|r| policy::overloaded(&r.transport)) {
        Concurrency::Halve
    } else if answers.is_empty() {
        Concurrency::Keep
    } else {
        Concurrency::Grow
    };
    Judgement {
        outcomes,
        effects: fx,
    }
}

fn status_of(r: &Response) -> Option<i32> {
    match r.transport {
        Transport::Status(s) => Some(s as i32),
        _ => None,
    }
}

fn one(
    c: &Case,
    max_retries: i32,
    jitter: &mut dyn FnMut() -> f64,
    now: chrono::DateTime<chrono::Utc>,
    fx: &mut Effects,
) -> Outcome {
    let (is_delete, versioned) = match c.planned {
        Planned::AlreadyGone => {
            return Outcome::Delivered {
                fhir_id: None,
                version: None,
                deleted: true,
            }
        }
        Planned::Wait(reason) => {
            return Outcome::Wait {
                delay: policy::dependency_wait(c.age_s),
                reason: reason.to_string(),
            }
        }
        Planned::Fail(class, error) => {
            fx.failed += 1;
            return Outcome::DeadLetter {
                class,
                error: error.to_string(),
                http_status: None,
                outcome: None,
                attempted: false,
            };
        }
        Planned::Put { versioned } => (false, versioned),
        Planned::Delete => (true, false),
    };
    let Some(r) = c.response else {
        return Outcome::Release;
    };
    let status = status_of(r);
    let verdict = policy::classify_request(&r.transport, is_delete, versioned);
    match verdict {
        Verdict::Delivered => {
            let (fhir_id, version) = if is_delete {
                (None, None)
            } else {
                match resource_id(r) {
                    Ok(ids) => ids,
                    Err(why) => {
                        // Applied by the server, but what it calls the resource cannot address
                        // it: a DBA must look before updates go on.
                        fx.failed += 1;
                        return Outcome::DeadLetter {
                            class: Class::Rejected,
                            error: format!("HTTP {}: {why}", status.unwrap_or(0)),
                            http_status: status,
                            outcome: None,
                            attempted: true,
                        };
                    }
                }
            };
            fx.processed += c.changes as u64;
            fx.succeeded = true;
            Outcome::Delivered {
                fhir_id,
                version,
                deleted: is_delete,
            }
        }
        Verdict::Pause(class) => {
            fx.call_errors.push(class);
            fx.pause = Some((class, policy::pause_length(class)));
            Outcome::Release
        }
        Verdict::Retry(class) => {
            fx.call_errors.push(class);
            fx.failed += 1;
            let attempts = c.attempts + 1;
            let error = describe_failure(r);
            let retry_after = r
                .retry_after
                .as_deref()
                .and_then(|v| policy::parse_retry_after(v, now));
            if let Some(ra) = retry_after {
                fx.pause = Some((Class::Transient, ra));
            } else if status == Some(429) {
                fx.pause = Some((Class::Transient, policy::THROTTLE_PAUSE));
            }
            if policy::exhausted(attempts, max_retries) {
                Outcome::DeadLetter {
                    class: Class::Exhausted,
                    error: format!("gave up after {attempts} attempts: {error}"),
                    http_status: status,
                    outcome: operation_outcome(r),
                    attempted: true,
                }
            } else {
                Outcome::Retry {
                    delay: policy::backoff(attempts, retry_after, jitter()),
                    class,
                    error,
                    http_status: status,
                }
            }
        }
        Verdict::DeadLetter(class) => {
            fx.call_errors.push(class);
            fx.failed += 1;
            Outcome::DeadLetter {
                class,
                error: describe_failure(r),
                http_status: status,
                outcome: operation_outcome(r),
                attempted: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(t: Transport, body: Value, retry_after: Option<&str>) -> Response {
        let error = match &t {
            Transport::Status(_) => None,
            _ => Some("connection reset".into()),
        };
        Response {
            transport: t,
            body: if body.is_null() {
                Vec::new()
            } else {
                serde_json::to_vec(&body).unwrap()
            },
            etag: None,
            location: None,
            retry_after: retry_after.map(str::to_string),
            elapsed: Duration::ZERO,
            error,
        }
    }

    fn status(s: u16) -> Response {
        answer(Transport::Status(s), Value::Null, None)
    }

    fn created() -> Response {
        answer(
            Transport::Status(201),
            json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "3"}}),
            None,
        )
    }

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    const PUT: Planned = Planned::Put { versioned: false };
    const PUT_IF_MATCH: Planned = Planned::Put { versioned: true };

    fn case<'a>(planned: Planned<'a>, attempts: i32, r: Option<&'a Response>) -> Case<'a> {
        Case {
            planned,
            attempts,
            age_s: 0.0,
            changes: 2,
            response: r,
        }
    }

    fn judge_one(c: Case) -> (Outcome, Effects) {
        let j = judge(&[c], 5, &mut || 0.5, now());
        (j.outcomes.into_iter().next().unwrap(), j.effects)
    }

    fn retry(delay_s: u64, class: Class, st: Option<i32>) -> impl Fn(&Outcome) -> bool {
        move |o| {
            matches!(o, Outcome::Retry { delay, class: c, http_status, .. }
                     if *delay == Duration::from_secs(delay_s) && *c == class && *http_status == st)
        }
    }

    fn dead(class: Class, st: Option<i32>, attempted: bool) -> impl Fn(&Outcome) -> bool {
        move |o| {
            matches!(o, Outcome::DeadLetter { class: c, http_status, attempted: a, .. }
                     if *c == class && *http_status == st && *a == attempted)
        }
    }

    type Check = Box<dyn Fn(&Outcome) -> bool>;
    /// name, case, expected outcome, pause (class, whole seconds), (processed, failed, dead).
    type Row<'a> = (
        &'a str,
        Case<'a>,
        Check,
        Option<(Class, u64)>,
        (u64, u64, u64),
    );

    /// One row per verdict: the plan, its attempts, the answer; the outcome expected, the
    /// pause, and the counters (processed changes, failed resources, dead-lettered changes).
    #[test]
    fn every_verdict_settles_and_counts_as_expected() {
        let conflict = status(409);
        let stale_version = status(412);
        let ambiguous = status(412);
        let too_many = status(429);
        let too_many_later = answer(Transport::Status(429), Value::Null, Some("7"));
        let unavailable = answer(
            Transport::Status(503),
            Value::Null,
            Some("Thu, 01 Jan 2026 00:00:20 GMT"),
        );
        let rejected = answer(
            Transport::Status(422),
            json!({"resourceType": "OperationOutcome",
                   "issue": [{"severity": "error", "code": "invalid", "diagnostics": "bad"}]}),
            None,
        );
        let gone = status(410);
        let unauthorized = status(401);
        let broken = answer(Transport::Broken, Value::Null, None);
        let refused = answer(Transport::ConnectFailed, Value::Null, None);
        let bad_id = answer(
            Transport::Status(201),
            json!({"resourceType": "Patient", "id": "not an id!"}),
            None,
        );
        let ok = created();
        let deleted = status(204);
        let delivered = |id: Option<&'static str>, del: bool| -> Check {
            Box::new(move |o| {
                matches!(o, Outcome::Delivered { fhir_id, deleted, .. }
                         if fhir_id.as_deref() == id && *deleted == del)
            })
        };
        let cases: Vec<Row> = vec![
            (
                "created",
                case(PUT, 0, Some(&ok)),
                delivered(Some("p1"), false),
                None,
                (2, 0, 0),
            ),
            (
                "deleted",
                case(Planned::Delete, 0, Some(&deleted)),
                delivered(None, true),
                None,
                (2, 0, 0),
            ),
            (
                "delete of a resource gone",
                case(Planned::Delete, 0, Some(&gone)),
                delivered(None, true),
                None,
                (2, 0, 0),
            ),
            (
                "nothing to delete",
                case(Planned::AlreadyGone, 0, None),
                delivered(None, true),
                None,
                (0, 0, 0),
            ),
            (
                "not sent",
                case(PUT, 0, None),
                Box::new(|o| *o == Outcome::Release),
                None,
                (0, 0, 0),
            ),
            (
                "waits for its patient",
                case(Planned::Wait("no patient"), 0, None),
                Box::new(
                    |o| matches!(o, Outcome::Wait { delay, .. } if *delay == Duration::from_millis(200)),
                ),
                None,
                (0, 0, 0),
            ),
            (
                "unmappable",
                case(Planned::Fail(Class::Unmappable, "bad date"), 0, None),
                Box::new(dead(Class::Unmappable, None, false)),
                None,
                (0, 1, 2),
            ),
            (
                "transient, first failure",
                case(PUT, 0, Some(&broken)),
                Box::new(retry(1, Class::Transient, None)),
                None,
                (0, 1, 0),
            ),
            (
                "transient, third failure",
                case(PUT, 2, Some(&broken)),
                Box::new(retry(4, Class::Transient, None)),
                None,
                (0, 1, 0),
            ),
            (
                "transient, out of retries",
                case(PUT, 4, Some(&broken)),
                Box::new(dead(Class::Exhausted, None, true)),
                None,
                (0, 1, 2),
            ),
            (
                "409 conflict",
                case(PUT, 0, Some(&conflict)),
                Box::new(retry(1, Class::Conflict, Some(409))),
                None,
                (0, 1, 0),
            ),
            (
                "412 on If-Match: lost a race",
                case(PUT_IF_MATCH, 0, Some(&stale_version)),
                Box::new(retry(1, Class::Conflict, Some(412))),
                None,
                (0, 1, 0),
            ),
            (
                "412 on an identifier: ambiguous",
                case(PUT, 0, Some(&ambiguous)),
                Box::new(dead(Class::Rejected, Some(412), true)),
                None,
                (0, 1, 2),
            ),
            (
                "422 rejected",
                case(PUT, 0, Some(&rejected)),
                Box::new(dead(Class::Rejected, Some(422), true)),
                None,
                (0, 1, 2),
            ),
            (
                "429 without Retry-After",
                case(PUT, 0, Some(&too_many)),
                Box::new(retry(1, Class::Transient, Some(429))),
                Some((Class::Transient, 1)),
                (0, 1, 0),
            ),
            (
                "429 with Retry-After: 7",
                case(PUT, 0, Some(&too_many_later)),
                Box::new(retry(7, Class::Transient, Some(429))),
                Some((Class::Transient, 7)),
                (0, 1, 0),
            ),
            (
                "503 with an HTTP-date",
                case(PUT, 0, Some(&unavailable)),
                Box::new(retry(20, Class::Transient, Some(503))),
                Some((Class::Transient, 20)),
                (0, 1, 0),
            ),
            (
                "401: pause, no attempt",
                case(PUT, 0, Some(&unauthorized)),
                Box::new(|o| *o == Outcome::Release),
                Some((Class::Auth, 60)),
                (0, 0, 0),
            ),
            (
                "unreachable: pause, no attempt",
                case(PUT, 0, Some(&refused)),
                Box::new(|o| *o == Outcome::Release),
                Some((Class::Unreachable, 0)),
                (0, 0, 0),
            ),
            (
                "applied, but an id that cannot address it",
                case(PUT, 0, Some(&bad_id)),
                Box::new(dead(Class::Rejected, Some(201), true)),
                None,
                (0, 1, 2),
            ),
        ];
        for (name, c, check, pause, (processed, failed, dead_rows)) in cases {
            let (o, fx) = judge_one(c);
            assert!(check(&o), "{name}: {o:?}");
            let pause_s = fx.pause.map(|(c, d)| (c, d.as_secs()));
            assert_eq!(pause_s, pause, "{name}: pause");
            assert_eq!(
                (fx.processed, fx.failed, fx.dead_lettered),
                (processed, failed, dead_rows),
                "{name}: counters"
            );
            assert_eq!(fx.succeeded, processed > 0, "{name}: success");
        }
    }

    #[test]
    fn failures_keep_the_servers_words_for_the_dead_letter_table() {
        let rejected = answer(
            Transport::Status(422),
            json!({"resourceType": "OperationOutcome",
                   "issue": [{"severity": "error", "code": "invalid", "diagnostics": "birthDate is invalid"}]}),
            None,
        );
        let (o, _) = judge_one(case(PUT, 0, Some(&rejected)));
        let Outcome::DeadLetter { error, outcome, .. } = o else {
            panic!("{o:?}")
        };
        assert!(
            error.starts_with("HTTP 422") && error.contains("birthDate is invalid"),
            "{error}"
        );
        assert_eq!(outcome.unwrap()["resourceType"], "OperationOutcome");
        let (o, _) = judge_one(case(PUT, 4, Some(&status(503))));
        let Outcome::DeadLetter { error, .. } = o else {
            panic!("{o:?}")
        };
        assert!(
            error.starts_with("gave up after 5 attempts: HTTP 503"),
            "{error}"
        );
    }

    #[test]
    fn concurrency_halves_on_overload_and_grows_on_clean_answers() {
        let ok = created();
        let busy = status(503);
        let rejected = status(422);
        let run = |cases: &[Case]| judge(cases, 5, &mut || 0.5, now()).effects.concurrency;
        assert_eq!(
            run(&[case(PUT, 0, Some(&ok)), case(PUT, 0, Some(&busy))]),
            Concurrency::Halve
        );
        assert_eq!(
            run(&[case(PUT, 0, Some(&ok)), case(PUT, 0, Some(&rejected))]),
            Concurrency::Grow
        );
        assert_eq!(
            run(&[case(PUT, 0, None), case(Planned::AlreadyGone, 0, None)]),
            Concurrency::Keep
        );
    }

    #[test]
    fn a_tier_mixes_outcomes_and_sums_counters_and_the_call_errors_keep_their_order() {
        let ok = created();
        let conflict = status(409);
        let unauthorized = status(403);
        let j = judge(
            &[
                case(PUT, 0, Some(&ok)),
                case(PUT, 0, Some(&conflict)),
                case(Planned::Fail(Class::Unmappable, "x"), 0, None),
                case(PUT, 0, Some(&unauthorized)),
            ],
            5,
            &mut || 0.5,
            now(),
        );
        assert!(matches!(j.outcomes[0], Outcome::Delivered { .. }));
        assert!(matches!(j.outcomes[1], Outcome::Retry { .. }));
        assert!(matches!(j.outcomes[2], Outcome::DeadLetter { .. }));
        assert_eq!(j.outcomes[3], Outcome::Release);
        assert_eq!(j.effects.call_errors, vec![Class::Conflict, Class::Auth]);
        assert_eq!(
            (
                j.effects.processed,
                j.effects.failed,
                j.effects.dead_lettered
            ),
            (2, 2, 2)
        );
        assert_eq!(j.effects.pause, Some((Class::Auth, policy::AUTH_PAUSE)));
    }

    #[test]
    fn jitter_spreads_retries_within_a_quarter() {
        let broken = answer(Transport::Broken, Value::Null, None);
        for (j, lo, hi) in [(0.0, 3000, 3000), (0.999, 4990, 5000)] {
            let out = judge(&[case(PUT, 2, Some(&broken))], 5, &mut || j, now());
            let Outcome::Retry { delay, .. } = &out.outcomes[0] else {
                panic!()
            };
            let ms = delay.as_millis() as u64;
            assert!((lo..=hi).contains(&ms), "{j}: {ms} ms");
        }
    }
}
