//! Applying a tier's verdict: the one place where the worker's decisions (fhir_sync_core's
//! `verdict::judge`) become a settlement to record, shared-memory counters, a pause and the
//! concurrency used next. Nothing is decided here.

use super::claim::Claimed;
use super::map::Action;
use super::policy::Class;
use super::settle::{self, Settlement};
use super::Worker;
use crate::http::Response;
use crate::shmem;
use fhir_sync_core::verdict::{self, Case, Concurrency, Outcome, Planned};
use pgrx::pg_sys;
use std::sync::atomic::Ordering;

fn planned(a: &Action) -> Planned<'_> {
    match a {
        Action::AlreadyGone => Planned::AlreadyGone,
        Action::Wait(reason) => Planned::Wait(reason),
        Action::Fail(class, error) => Planned::Fail(*class, error),
        Action::Put { if_match, .. } => Planned::Put {
            versioned: if_match.is_some(),
        },
        Action::Delete { .. } => Planned::Delete,
    }
}

impl Worker {
    /// Judges a tier's answers and applies what the verdict says to the worker; returns the
    /// settlement to record.
    pub(super) fn judge(
        &mut self,
        tier: &[Claimed],
        actions: &[Action],
        request_of: &[Option<usize>],
        responses: &[Option<Response>],
        deps: Vec<(pg_sys::Oid, String)>,
    ) -> Settlement {
        let cases: Vec<Case> = tier
            .iter()
            .zip(actions)
            .zip(request_of)
            .map(|((c, a), r)| Case {
                planned: planned(a),
                attempts: c.attempts,
                age_s: c.age_s,
                changes: c.outbox_ids.len(),
                response: r.and_then(|r| responses.get(r)).and_then(|r| r.as_ref()),
            })
            .collect();
        let j = verdict::judge(
            &cases,
            crate::gucs::max_retries(),
            &mut || self.jitter(),
            chrono::Utc::now(),
        );
        let mut s = Settlement {
            dependencies: deps,
            ..Default::default()
        };
        for ((c, a), o) in tier.iter().zip(actions).zip(j.outcomes) {
            let ids = c.outbox_ids.clone();
            match o {
                Outcome::Delivered {
                    fhir_id,
                    version,
                    deleted,
                } => s.delivered.push(settle::Delivered {
                    outbox_ids: ids,
                    resource_table: c.resource_table,
                    resource_key: c.resource_key.clone(),
                    resource_type: c.resource_type.clone(),
                    fhir_id,
                    version,
                    identifier: match a {
                        Action::Put { identifier, .. } => Some(identifier.clone()),
                        _ => None,
                    },
                    deleted,
                    first_write: a.is_first_write(),
                }),
                Outcome::Wait { delay, reason } => s.waits.push(settle::Wait {
                    outbox_ids: ids,
                    delay_ms: delay.as_millis() as i64,
                    reason,
                }),
                Outcome::Retry {
                    delay,
                    class,
                    error,
                    http_status,
                } => s.retries.push(settle::Retry {
                    outbox_ids: ids,
                    delay_ms: delay.as_millis() as i64,
                    error,
                    class: class.name(),
                    http_status,
                }),
                Outcome::DeadLetter {
                    class,
                    error,
                    http_status,
                    outcome,
                    attempted,
                } => {
                    // Ids, class and status only: the error may quote the server quoting the row.
                    let after = match class {
                        Class::Exhausted => format!(" after {} attempts", c.attempts + 1),
                        _ => String::new(),
                    };
                    let how = match (attempted, http_status) {
                        (false, _) => "no request was made".to_string(),
                        (true, Some(st)) => format!("HTTP {st}"),
                        (true, None) => "no HTTP answer".to_string(),
                    };
                    pgrx::warning!(
                        "fhir_sync worker: outbox rows {:?} dead-lettered ({}{after}): {how}",
                        c.outbox_ids,
                        class.name(),
                    );
                    s.dead.push(settle::DeadLetter {
                        outbox_ids: ids,
                        class: class.name(),
                        error,
                        http_status,
                        outcome,
                        attempted,
                    });
                }
                // Not answered (the worker is leaving): its lease ends with the others.
                Outcome::Release => s.handed_back = true,
            }
        }

        let fx = j.effects;
        let shared = self.shared;
        shared
            .processed_total
            .fetch_add(fx.processed, Ordering::Relaxed);
        shared.failed_total.fetch_add(fx.failed, Ordering::Relaxed);
        shared
            .dead_lettered_total
            .fetch_add(fx.dead_lettered, Ordering::Relaxed);
        for class in &fx.call_errors {
            shared.record_call_error(class.index());
        }
        if let Some(class) = fx.call_errors.last() {
            self.slot
                .last_error_class
                .store(class.index() as u32, Ordering::Relaxed);
            self.slot
                .last_error_ms
                .store(shmem::now_ms(), Ordering::Relaxed);
        }
        if fx.succeeded {
            self.slot
                .last_success_ms
                .store(shmem::now_ms(), Ordering::Relaxed);
        }
        match fx.concurrency {
            Concurrency::Halve => self.in_flight = (self.in_flight / 2).max(1),
            Concurrency::Grow => self.in_flight = self.in_flight.saturating_add(1),
            Concurrency::Keep => {}
        }
        if let Some((class, wait)) = fx.pause {
            self.pause_for(class, wait);
        }
        s
    }
}

/// A first write is resolved by the server by identifier, and the server may match more than
/// the identifier fhir_sync checked (a Patient's other identifiers, a case-insensitive match):
/// a first write whose answer names a resource another row already maps to has just written
/// this row's data onto that row's resource. It cannot be undone; it is made loud and stopped
/// from happening again: the change is dead-lettered (identifier_conflict), and the row's state
/// records the shared id, so that the identity guard refuses its later updates and keeps its
/// deletes from deleting the other row's resource.
pub(super) fn merged_on_the_server(
    schema: &str,
    s: &mut Settlement,
) -> Result<(), crate::error::FhirSyncError> {
    let first: Vec<usize> = s
        .delivered
        .iter()
        .enumerate()
        .filter(|(_, d)| d.first_write && d.fhir_id.is_some() && !d.deleted)
        .map(|(i, _)| i)
        .collect();
    if first.is_empty() {
        return Ok(());
    }
    let ids: Vec<(String, String)> = first
        .iter()
        .map(|i| {
            let d = &s.delivered[*i];
            (
                d.resource_type.clone(),
                d.fhir_id.clone().unwrap_or_default(),
            )
        })
        .collect();
    // Its own short transaction (the answers are judged with none open), only when there is
    // a first write to check.
    let (holders, names) =
        crate::subxact::transaction_flat(|| crate::source::identifier_holders(schema, &[], &ids))?;
    for i in first.into_iter().rev() {
        let d = &s.delivered[i];
        let me = (d.resource_table.to_u32(), d.resource_key.clone());
        let key = (
            d.resource_type.clone(),
            d.fhir_id.clone().unwrap_or_default(),
        );
        let Some(other) = holders
            .by_id
            .get(&key)
            .and_then(|rows| rows.iter().find(|r| **r != me))
        else {
            continue;
        };
        let name = |r: &(u32, String)| crate::source::row_name(&names, r);
        let mut record = s.delivered.remove(i);
        pgrx::warning!(
            "fhir_sync worker: outbox rows {:?} dead-lettered (identifier_conflict): the server matched {} to the resource {} maps to",
            record.outbox_ids,
            name(&me),
            name(other)
        );
        s.dead.push(settle::DeadLetter {
            outbox_ids: std::mem::take(&mut record.outbox_ids),
            class: Class::IdentifierConflict.name(),
            error: format!(
                "{}: the server matched its first write to the {} of {} (by another of that resource's identifiers, or a looser match) and wrote this row's data there; check that resource, then give this row an identifier of its own",
                name(&me),
                record.resource_type,
                name(other)
            ),
            http_status: None,
            outcome: None,
            attempted: true,
        });
        // Kept as the server left it: both rows now map to one resource.
        s.delivered.push(record);
    }
    Ok(())
}
