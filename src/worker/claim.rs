//! Claim: lease a batch of pending changes, whole resources at a time, in one short
//! transaction.
//!
//! Claims are serialised per database by a transaction-level advisory lock, so two workers
//! can never lease the same resource: a resource is claimable only when none of its pending
//! changes is leased by another live worker or waiting for a retry. All its pending changes are
//! leased together and settled by one request (the resource as it stands now).

use crate::error::FhirSyncError;
use pgrx::prelude::*;

/// One resource to deliver, with the outbox rows it settles.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub resource_table: pg_sys::Oid,
    pub resource_key: String,
    pub resource_type: String,
    pub outbox_ids: Vec<i64>,
    pub attempts: i32,
    /// The identifier the capture trigger saw (patients), newest first.
    pub identifier: Option<(String, String)>,
    /// Age of the oldest of its changes, seconds.
    pub age_s: f64,
}

/// Pids of running fhir_sync workers. A lease held by any other pid belongs to a worker that
/// died (kill -9, crash): it is taken over at once instead of after lease_time.
pub fn live_workers() -> Vec<i32> {
    crate::shmem::shared()
        .map(|s| {
            s.workers
                .iter()
                .map(|w| w.pid.load(std::sync::atomic::Ordering::Acquire))
                .filter(|p| *p != 0)
                .collect()
        })
        .unwrap_or_default()
}

const CLAIM_LOCK: i64 = 0x6668_6972_5f73_796e; // "fhir_syn"

/// The claim statement: $1 batch size, $2 this worker's pid, $3 lease in ms, $4 live worker pids.
pub fn claim_sql(schema: &str) -> String {
    format!(
        "WITH cand AS (
            SELECT o.id, o.resource_table, o.resource_key FROM {schema}.fhir_outbox o
             WHERE NOT o.processed
               AND (o.next_retry_at IS NULL OR o.next_retry_at <= pg_catalog.now())
               AND (o.lock_expires_at IS NULL OR o.lock_expires_at < pg_catalog.now() OR o.locked_by <> ALL ($4))
             ORDER BY o.next_retry_at NULLS FIRST, o.id
             LIMIT $1 * 2
         ), res AS (
            SELECT c.resource_table, c.resource_key, pg_catalog.min(c.id) AS first_id FROM cand c
             WHERE NOT EXISTS (
                   SELECT 1 FROM {schema}.fhir_outbox b
                    WHERE b.resource_table = c.resource_table AND b.resource_key = c.resource_key
                      AND NOT b.processed
                      AND ((b.lock_expires_at >= pg_catalog.now() AND b.locked_by IS DISTINCT FROM $2
                            AND b.locked_by = ANY ($4))
                           OR b.next_retry_at > pg_catalog.now()))
             GROUP BY 1, 2 ORDER BY first_id LIMIT $1
         ), leased AS (
            UPDATE {schema}.fhir_outbox o
               SET locked_by = $2, lock_expires_at = pg_catalog.now() + $3 * interval '1 millisecond'
              FROM res
             WHERE o.resource_table = res.resource_table AND o.resource_key = res.resource_key AND NOT o.processed
            RETURNING o.id, o.resource_table, o.resource_key, o.resource_type, o.attempts,
                      o.identifier_system, o.identifier_value, o.created_at
         )
         SELECT resource_table::pg_catalog.oid, resource_key, pg_catalog.max(resource_type),
                pg_catalog.array_agg(id ORDER BY id), pg_catalog.max(attempts),
                (pg_catalog.array_agg(identifier_system ORDER BY id DESC) FILTER (WHERE identifier_value IS NOT NULL))[1],
                (pg_catalog.array_agg(identifier_value ORDER BY id DESC) FILTER (WHERE identifier_value IS NOT NULL))[1],
                extract(epoch FROM pg_catalog.clock_timestamp() - pg_catalog.min(created_at))::float8
           FROM leased GROUP BY 1, 2 ORDER BY pg_catalog.min(id)"
    )
}

pub fn claim(schema: &str, batch: i64, lease_ms: i64) -> Result<Vec<Claimed>, FhirSyncError> {
    let pid = unsafe { pg_sys::MyProcPid };
    let sql = claim_sql(schema);
    Spi::connect_mut(|client| {
        client.update(
            "SELECT pg_catalog.pg_advisory_xact_lock($1)",
            None,
            &[CLAIM_LOCK.into()],
        )?;
        let mut out = Vec::new();
        let live = live_workers();
        for row in client.update(
            sql.as_str(),
            None,
            &[batch.into(), pid.into(), lease_ms.into(), live.into()],
        )? {
            let identifier = match (row.get::<String>(6)?, row.get::<String>(7)?) {
                (Some(s), Some(v)) => Some((s, v)),
                _ => None,
            };
            out.push(Claimed {
                resource_table: row.get(1)?.unwrap_or(pg_sys::InvalidOid),
                resource_key: row.get(2)?.unwrap_or_default(),
                resource_type: row.get(3)?.unwrap_or_default(),
                outbox_ids: row.get::<Vec<i64>>(4)?.unwrap_or_default(),
                attempts: row.get(5)?.unwrap_or(0),
                identifier,
                age_s: row.get(8)?.unwrap_or(0.0),
            });
        }
        Ok(out)
    })
}
