//! Settle: record what happened to each claimed resource, in one short transaction per tier.
//! Every statement is a set statement over arrays: one round trip per kind of outcome, not
//! one per row. (The leases end after it commits: lease.rs.)

use crate::error::FhirSyncError;
use pgrx::prelude::*;

pub struct Delivered {
    pub outbox_ids: Vec<i64>,
    pub resource_table: pg_sys::Oid,
    pub resource_key: String,
    pub resource_type: String,
    pub fhir_id: Option<String>,
    pub version: Option<String>,
    pub identifier: Option<(String, String)>,
    pub deleted: bool,
    /// Written by identifier (a conditional update or create): the server chose the resource.
    pub first_write: bool,
}

pub struct Retry {
    pub outbox_ids: Vec<i64>,
    pub delay_ms: i64,
    pub error: String,
    pub class: &'static str,
    pub http_status: Option<i32>,
}

pub struct DeadLetter {
    pub outbox_ids: Vec<i64>,
    pub class: &'static str,
    pub error: String,
    pub http_status: Option<i32>,
    pub outcome: Option<serde_json::Value>,
    /// Whether this failure spends an attempt (a rejected request does; a mapping error,
    /// which made no request, does not).
    pub attempted: bool,
}

pub struct Wait {
    pub outbox_ids: Vec<i64>,
    pub delay_ms: i64,
    pub reason: String,
}

#[derive(Default)]
pub struct Settlement {
    pub delivered: Vec<Delivered>,
    pub retries: Vec<Retry>,
    pub dead: Vec<DeadLetter>,
    pub waits: Vec<Wait>,
    /// Some changes go back unsent (their leases end with the tier's): they may lie below the
    /// claim's floor.
    pub handed_back: bool,
    pub dependencies: Vec<(pg_sys::Oid, String)>,
}

pub fn settle(schema: &str, s: &Settlement) -> Result<(), FhirSyncError> {
    Spi::connect_mut(|client| {
        if !s.delivered.is_empty() {
            // The state write joins the batch with fhir_sync_state: one index probe per row, never
            // a hash join over the table, whatever its statistics say.
            client.update(super::claim::PLAN_GUARDS, None, &[])?;
            let (mut ids, mut fids, mut vers) = (Vec::new(), Vec::new(), Vec::new());
            for d in &s.delivered {
                for id in &d.outbox_ids {
                    ids.push(*id);
                    fids.push(d.fhir_id.clone());
                    vers.push(d.version.clone());
                }
            }
            // A delivered change leaves the outbox for the unlogged history: a heap delete in
            // the WAL, not a new version of the row with an entry in each index.
            crate::plans::update(
                client,
                &format!(
                    "WITH moved AS (
                        DELETE FROM {schema}.fhir_outbox o
                         USING unnest($1::bigint[], $2::text[], $3::text[]) AS d(id, fid, ver)
                         WHERE o.id = d.id
                     RETURNING o.id, o.txid, o.table_name, o.record_id, o.operation, o.resource_type,
                               o.resource_table, o.resource_key, o.created_at, o.attempts, o.first_failed_at,
                               d.fid, d.ver)
                     INSERT INTO {schema}.fhir_outbox_delivered (id, txid, table_name, record_id, operation,
                            resource_type, resource_table, resource_key, created_at, processed_at, attempts,
                            first_failed_at, fhir_resource_id, fhir_version)
                     SELECT id, txid, table_name, record_id, operation, resource_type, resource_table,
                            resource_key, created_at, pg_catalog.now(), attempts, first_failed_at, fid, ver
                       FROM moved"
                ),
                &[ids.into(), fids.into(), vers.into()],
            )?;
            let d = latest_per_row(&s.delivered);
            let rts: Vec<pg_sys::Oid> = d.iter().map(|x| x.resource_table).collect();
            let rks: Vec<String> = d.iter().map(|x| x.resource_key.clone()).collect();
            let tys: Vec<String> = d.iter().map(|x| x.resource_type.clone()).collect();
            let fids: Vec<Option<String>> = d.iter().map(|x| x.fhir_id.clone()).collect();
            let vers: Vec<Option<String>> = d.iter().map(|x| x.version.clone()).collect();
            let isys: Vec<Option<String>> = d
                .iter()
                .map(|x| x.identifier.as_ref().map(|i| i.0.clone()))
                .collect();
            let ival: Vec<Option<String>> = d
                .iter()
                .map(|x| x.identifier.as_ref().map(|i| i.1.clone()))
                .collect();
            let dels: Vec<bool> = d.iter().map(|x| x.deleted).collect();
            let last: Vec<i64> = d.iter().map(|x| last_id(x)).collect();
            // A first write and a delete rewrite the logged row anyway (a new id, the deleted mark),
            // and it takes their version: the cache is for the other updates. The reader takes the
            // row the later settle wrote (settles of one resource never overlap: leases).
            let cache: Vec<bool> = d.iter().map(|x| !x.first_write && !x.deleted).collect();
            crate::plans::update(
                client,
                &format!(
                    // The logged row is rewritten only when what it maps to changes (an id, a
                    // delete, the identifier, the type): an update's new version goes to the
                    // unlogged cache alone. The rewrite is a plain UPDATE of the rows that exist
                    // (a first write reserved its row before it was sent), HOT when the page has
                    // room: an upsert would first lock each row, one more WAL record. Then an
                    // insert of the rows not there: a row that exists is found by the conflict
                    // check before anything is written (the insert does not see the update, which
                    // runs in the same snapshot, and needs no anti-join with it).
                    "WITH u AS (SELECT * FROM unnest($1::oid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                                     $6::text[], $7::text[], $8::boolean[], $9::bigint[], $10::boolean[])
                                     AS u(rt, rk, ty, fid, ver, isys, ival, del, last, cache)),
                          cached AS (
                            INSERT INTO {schema}.fhir_sync_version AS v (resource_table, resource_key, fhir_version,
                                   synced_at, outbox_id)
                            SELECT u.rt::pg_catalog.regclass, u.rk, u.ver, pg_catalog.now(), u.last FROM u WHERE u.cache
                            ON CONFLICT (resource_table, resource_key) DO UPDATE SET
                                   fhir_version = excluded.fhir_version, synced_at = excluded.synced_at,
                                   outbox_id = excluded.outbox_id
                             -- never an older version over a newer one (a settle that comes late, its
                             -- lease expired): the next update's If-Match would fail and cost a
                             -- re-read. By settle time, not outbox id: ids are taken at capture, and a
                             -- transaction that commits late brings a lower id after a higher one.
                             WHERE v.synced_at <= excluded.synced_at),
                          updated AS (
                            UPDATE {schema}.fhir_sync_state s SET
                                   resource_type = u.ty,
                                   fhir_id = coalesce(u.fid, s.fhir_id),
                                   fhir_version = u.ver,
                                   identifier_system = coalesce(u.isys, s.identifier_system),
                                   identifier_value = coalesce(u.ival, s.identifier_value),
                                   deleted = u.del, last_synced_at = pg_catalog.now(),
                                   -- (0: a write whose changes went to the row it merged with)
                                   last_outbox_id = coalesce(NULLIF(u.last, 0), s.last_outbox_id)
                              FROM u
                             WHERE s.resource_table = u.rt::pg_catalog.regclass AND s.resource_key = u.rk
                               AND (s.resource_type IS DISTINCT FROM u.ty
                                    OR s.fhir_id IS DISTINCT FROM coalesce(u.fid, s.fhir_id)
                                    OR s.deleted IS DISTINCT FROM u.del
                                    OR s.identifier_system IS DISTINCT FROM coalesce(u.isys, s.identifier_system)
                                    OR s.identifier_value IS DISTINCT FROM coalesce(u.ival, s.identifier_value)
                                    OR (NOT u.cache AND s.fhir_version IS DISTINCT FROM u.ver)))
                     INSERT INTO {schema}.fhir_sync_state AS s (resource_table, resource_key, resource_type, fhir_id,
                            fhir_version, identifier_system, identifier_value, deleted, last_synced_at, last_outbox_id)
                     SELECT u.rt::pg_catalog.regclass, u.rk, u.ty, u.fid, u.ver, u.isys, u.ival, u.del, pg_catalog.now(), u.last
                       FROM u
                     ON CONFLICT (resource_table, resource_key) DO NOTHING"
                ),
                &[rts.into(), rks.into(), tys.into(), fids.into(), vers.into(), isys.into(), ival.into(), dels.into(), last.into(), cache.into()],
            )?;
        }
        if !s.retries.is_empty() {
            let (mut ids, mut delays, mut errs, mut classes, mut statuses) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for r in &s.retries {
                for id in &r.outbox_ids {
                    ids.push(*id);
                    delays.push(r.delay_ms);
                    errs.push(r.error.clone());
                    classes.push(r.class.to_string());
                    statuses.push(r.http_status);
                }
            }
            crate::plans::update(
                client,
                &format!(
                    "UPDATE {schema}.fhir_outbox o SET attempts = o.attempts + 1,
                            next_retry_at = pg_catalog.now() + u.delay * interval '1 millisecond',
                            last_error = u.err, error_class = u.cls,
                            http_status = u.st, first_failed_at = coalesce(o.first_failed_at, pg_catalog.now())
                       FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::int[])
                            AS u(id, delay, err, cls, st)
                      WHERE o.id = u.id"
                ),
                &[ids.into(), delays.into(), errs.into(), classes.into(), statuses.into()],
            )?;
        }
        if !s.waits.is_empty() {
            let (mut ids, mut delays, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
            for w in &s.waits {
                for id in &w.outbox_ids {
                    ids.push(*id);
                    delays.push(w.delay_ms);
                    reasons.push(w.reason.clone());
                }
            }
            crate::plans::update(
                client,
                &format!(
                    "UPDATE {schema}.fhir_outbox o SET next_retry_at = pg_catalog.now() + u.delay * interval '1 millisecond',
                            last_error = u.reason, error_class = 'waiting'
                       FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS u(id, delay, reason)
                      WHERE o.id = u.id"
                ),
                &[ids.into(), delays.into(), reasons.into()],
            )?;
        }
        let dlq = format!(
            "WITH moved AS (DELETE FROM {schema}.fhir_outbox WHERE id = ANY ($1) RETURNING *)
             INSERT INTO {schema}.fhir_dlq (outbox_ids, txid, table_name, record_id, operation, resource_type,
                    resource_table, resource_key, payload_json, identifier_system, identifier_value, error_class,
                    error, http_status, operation_outcome, attempts, first_failed_at, last_failed_at)
             SELECT pg_catalog.array_agg(id ORDER BY id), pg_catalog.max(txid),
                    (pg_catalog.array_agg(table_name ORDER BY id DESC))[1], (pg_catalog.array_agg(record_id ORDER BY id DESC))[1],
                    (pg_catalog.array_agg(operation ORDER BY id DESC))[1], pg_catalog.max(resource_type),
                    (pg_catalog.array_agg(resource_table))[1], (pg_catalog.array_agg(resource_key))[1],
                    (pg_catalog.array_agg(payload_json ORDER BY id DESC))[1],
                    (pg_catalog.array_agg(identifier_system ORDER BY id DESC))[1],
                    (pg_catalog.array_agg(identifier_value ORDER BY id DESC))[1],
                    $2, $3, $4, $5, pg_catalog.max(attempts) + $6, coalesce(pg_catalog.min(first_failed_at), pg_catalog.now()),
                    pg_catalog.now()
               FROM moved HAVING pg_catalog.count(*) > 0"
        );
        for d in &s.dead {
            client.update(
                dlq.as_str(),
                None,
                &[
                    d.outbox_ids.clone().into(),
                    d.class.to_string().into(),
                    d.error.clone().into(),
                    d.http_status.into(),
                    d.outcome.clone().map(pgrx::JsonB).into(),
                    (d.attempted as i32).into(),
                ],
            )?;
        }
        if !s.dependencies.is_empty() {
            let rts: Vec<pg_sys::Oid> = s.dependencies.iter().map(|d| d.0).collect();
            let keys: Vec<String> = s.dependencies.iter().map(|d| d.1.clone()).collect();
            crate::plans::update(
                client,
                &format!(
                    "INSERT INTO {schema}.fhir_outbox (table_name, record_id, operation, resource_type, resource_table, resource_key)
                     SELECT DISTINCT n.nspname || '.' || c.relname, u.k, 'U', t.resource_type, t.table_name, u.k
                       FROM unnest($1::oid[], $2::text[]) AS u(rt, k)
                       JOIN {schema}.fhir_tracked t ON t.table_name = u.rt::pg_catalog.regclass
                       JOIN pg_catalog.pg_class c ON c.oid = u.rt
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                      WHERE NOT EXISTS (SELECT 1 FROM {schema}.fhir_outbox o
                                         WHERE o.resource_table = t.table_name AND o.resource_key = u.k AND NOT o.processed)"
                ),
                &[rts.into(), keys.into()],
            )?;
        }
        Ok(())
    })
}

fn last_id(d: &Delivered) -> i64 {
    d.outbox_ids.iter().copied().max().unwrap_or(0)
}

/// One entry per source row, the one of its latest change: the state and cache writes are
/// upserts, and one statement may not write a row twice ("ON CONFLICT DO UPDATE command cannot
/// affect row a second time" would fail the whole settle, again at every retry).
fn latest_per_row(delivered: &[Delivered]) -> Vec<&Delivered> {
    let mut latest: std::collections::HashMap<(pg_sys::Oid, &str), &Delivered> =
        std::collections::HashMap::with_capacity(delivered.len());
    for d in delivered {
        latest
            .entry((d.resource_table, d.resource_key.as_str()))
            .and_modify(|cur| {
                if last_id(d) > last_id(cur) {
                    *cur = d;
                }
            })
            .or_insert(d);
    }
    let mut out: Vec<&Delivered> = latest.into_values().collect();
    out.sort_by_key(|d| last_id(d));
    out
}
