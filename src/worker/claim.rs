//! Claim: lease a batch of pending changes, whole resources at a time, in one short
//! transaction.
//!
//! Claims are serialised per database by a lock no SQL statement can name ([`lock_claims`]), so
//! two workers can never lease the same resource — and no ordinary role can take that lock and
//! stall delivery, as it could an advisory lock key (pg_advisory_lock is open to all) or a lock
//! on a table (several statements lock a table they name before checking the privilege): a
//! resource is claimable only when no other live worker leases it (shared memory, lease.rs) and
//! none of its pending changes is waiting for a retry. All its pending changes are leased
//! together and settled by one request (the resource as it stands now). The claim writes
//! nothing to the outbox: a lease is not worth a row version.
//!
//! A queue table's statistics are always wrong: autovacuum analyses it when the queue happens
//! to be empty, and the planner then expects one pending row. So the claim is three small
//! statements whose only sensible plans walk the partial indexes (the candidates come off
//! `fhir_outbox_pending_idx` in order; everything after is driven by those few keys), and the
//! claim transaction switches off the plan shapes that would scan the whole outbox.

use super::lease::{self, Leases};
use crate::error::FhirSyncError;
pub use fhir_sync_core::floor::Floor;
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

/// The plan shapes that would scan a whole table, switched off for the transaction: the claim's,
/// and the settle's join of a batch with `fhir_sync_state`.
pub(super) const PLAN_GUARDS: &str =
    "SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off; \
                           SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; \
                           SET LOCAL enable_bitmapscan = off";

/// Due changes in claim order: fresh ones first (from id $2 on), then retries that came due. $1
/// how many. Two scans of the same index, so that each starts where its range starts:
/// `next_retry_at IS NULL AND id >= $2` is an index condition, where an OR of the two ranges
/// would only be a filter over the whole front. What other workers lease is passed over after.
fn candidates_sql(schema: &str) -> String {
    format!(
        "(SELECT o.id, o.resource_table::pg_catalog.oid, o.resource_key, true AS fresh FROM {schema}.fhir_outbox o
           WHERE NOT o.processed AND o.next_retry_at IS NULL AND o.id >= $2
           ORDER BY o.next_retry_at NULLS FIRST, o.id LIMIT $1)
         UNION ALL
         (SELECT o.id, o.resource_table::pg_catalog.oid, o.resource_key, false FROM {schema}.fhir_outbox o
           WHERE NOT o.processed AND o.next_retry_at <= pg_catalog.now()
           ORDER BY o.next_retry_at NULLS FIRST, o.id LIMIT $1)
         LIMIT $1"
    )
}

/// The last value of the outbox's identity sequence ($1): ids up to it have been handed out.
const IDS_TAKEN: &str = "SELECT pg_catalog.pg_sequence_last_value($1::pg_catalog.regclass)";

/// The outbox's identity sequence ($1, the outbox's qualified name).
const OUTBOX_SEQUENCE: &str =
    "SELECT pg_catalog.pg_get_serial_sequence($1, 'id')::pg_catalog.regclass::pg_catalog.oid";

thread_local! {
    /// The outbox's identity sequence, per schema: looking it up costs a pg_depend scan, and it
    /// changes only with the extension (the worker forgets it after a failed cycle).
    static SEQUENCE: std::cell::RefCell<Option<(String, pg_sys::Oid)>> =
        const { std::cell::RefCell::new(None) };
}

/// Forgets the cached outbox sequence (the extension may have been dropped and made again).
pub fn forget_outbox() {
    SEQUENCE.with(|s| *s.borrow_mut() = None);
}

fn outbox_sequence(
    client: &pgrx::spi::SpiClient,
    schema: &str,
) -> Result<pg_sys::Oid, FhirSyncError> {
    if let Some(oid) = SEQUENCE.with(|s| {
        s.borrow()
            .as_ref()
            .filter(|(sch, _)| sch == schema)
            .map(|(_, o)| *o)
    }) {
        return Ok(oid);
    }
    let outbox = format!("{schema}.fhir_outbox");
    let oid = client
        .select(OUTBOX_SEQUENCE, Some(1), &[outbox.as_str().into()])?
        .first()
        .get::<pg_sys::Oid>(1)?
        .ok_or_else(|| FhirSyncError::Broken("fhir_outbox.id has no identity sequence".into()))?;
    SEQUENCE.with(|s| *s.borrow_mut() = Some((schema.to_string(), oid)));
    Ok(oid)
}

/// Every pending change of the given resources, whether it makes its resource busy (waiting for
/// a retry), and what the claim returns of it. $1 tables, $2 keys. LATERAL keeps the keys on the
/// outside of the join: one index probe per key, whatever the planner believes of the outbox.
/// `OFFSET 0` keeps the subquery from being pulled up into a plain join: after a TRUNCATE the
/// outbox looks empty to the planner, which then scans all of it once per key (measured: 270 ms
/// instead of 2 ms per claim).
fn pending_of_sql(schema: &str) -> String {
    format!(
        "SELECT u.t, u.k, p.id, p.held, p.resource_type, p.attempts, p.identifier_system, p.identifier_value, p.age
           FROM unnest($1::pg_catalog.oid[], $2::text[]) AS u(t, k)
          CROSS JOIN LATERAL (
                SELECT b.id, coalesce(b.next_retry_at > pg_catalog.now(), false) AS held, b.resource_type,
                       b.attempts, b.identifier_system, b.identifier_value,
                       extract(epoch FROM pg_catalog.clock_timestamp() - b.created_at)::float8 AS age
                  FROM {schema}.fhir_outbox b
                 WHERE b.resource_table = u.t::pg_catalog.regclass AND b.resource_key = u.k
                   AND NOT b.processed OFFSET 0) AS p"
    )
}

/// Takes this database's claim lock until the end of the transaction. An advisory-type lock tag
/// with a fourth field of 3: SQL's advisory functions build only 1 (one bigint key) and 2 (two
/// integers), and no other statement builds advisory tags, so no role can hold it; it still shows
/// in pg_locks (advisory, objsubid 3), waits under lock_timeout and joins deadlock detection.
fn lock_claims() {
    let tag = pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is set once the worker is connected, which it is here.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: 0x6668_6972, // "fhir"
        locktag_field3: 0x5f73_796e, // "_syn"
        locktag_field4: CLAIM_LOCK_FIELD4,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    };
    // SAFETY: a transaction-level lock (sessionLock = false) on a tag built above; it is released
    // with the transaction, committed or aborted; waiting is interruptible and bounded by
    // lock_timeout.
    unsafe {
        pg_sys::LockAcquire(
            &tag,
            pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
            false,
            false,
        );
    }
}

/// The fourth field of the claim lock's tag: one no SQL function uses.
const CLAIM_LOCK_FIELD4: u16 = 3;

/// Resources this worker has in flight: a claim made while they are out must pass them over.
/// (A claim passes over only the other workers' leases: this worker's own are its to take up
/// again, after a cycle that failed once its claim was made.)
pub type ResourcesInFlight = std::collections::HashSet<(pg_sys::Oid, String)>;

/// Leases up to `batch` resources, none of them in `exclude` or leased by another worker, and
/// publishes the leases in `leases` (None: a backend's claim, which is rolled back). With
/// `explain`, each statement runs under EXPLAIN (ANALYZE, BUFFERS) and its plan is appended
/// there (for fhir_sync_explain_claim; the caller rolls back).
pub fn claim_with(
    schema: &str,
    batch: i64,
    lease_ms: i64,
    exclude: &ResourcesInFlight,
    floor: &mut Floor,
    mut leases: Option<&mut Leases>,
    mut explain: Option<&mut Vec<String>>,
) -> Result<Vec<Claimed>, FhirSyncError> {
    let batch = match &leases {
        Some(l) => batch.min(l.room() as i64),
        None => batch,
    };
    if batch <= 0 {
        return Ok(Vec::new());
    }
    let now = std::time::Instant::now();
    let from = floor.start(now, crate::gucs::poll_interval());
    Spi::connect_mut(|client| {
        lock_claims();
        // Read under the claim lock: no other worker of this database claims meanwhile.
        let others = lease::held_by_others();
        // Several changes of one resource count once: read twice the batch, keep `batch`
        // resources; and as many more as are leased (this worker's in flight, and the other
        // workers'), which are passed over.
        let limit = batch * 2 + others.ids + leases.as_ref().map_or(0, |l| l.ids() as i64);
        client.update(PLAN_GUARDS, None, &[])?;
        if let Some(plans) = explain.as_mut() {
            let sql = format!("EXPLAIN (ANALYZE, BUFFERS) {}", candidates_sql(schema));
            plans.push("-- candidates".into());
            for row in client.select(sql.as_str(), None, &[limit.into(), from.into()])? {
                plans.push(row.get::<String>(1)?.unwrap_or_default());
            }
        }
        let mut order: Vec<(pg_sys::Oid, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut first_fresh: Option<i64> = None;
        // Read-write execution, for its snapshot (also below): a read-only statement would see
        // the transaction's first snapshot, taken before the claim lock was granted, in which
        // what the worker that held it settled meanwhile is still pending.
        for row in crate::plans::update(
            client,
            &candidates_sql(schema),
            &[limit.into(), from.into()],
        )? {
            let key = (
                row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                row.get::<String>(3)?.unwrap_or_default(),
            );
            let k = lease::key_of(key.0, &key.1);
            if row.get::<bool>(4)?.unwrap_or(false) {
                // Every fresh change counts, leased or not: a lease covers a resource, and a
                // change captured after its claim is not in the request on its way; the floor
                // must not pass it (nor one a leaseholder hands back as it exits). The floor
                // moves on once the batch in flight is settled.
                let id = row.get::<i64>(1)?.unwrap_or(0);
                first_fresh = Some(first_fresh.map_or(id, |f| f.min(id)));
            }
            // Passed over: this worker's own (in flight: `exclude`, or a resource that hashes like
            // one in flight, whose lease the other's settle would end) and other workers'.
            let taken = exclude.contains(&key)
                || leases.as_ref().is_some_and(|l| l.holds(k))
                || others.keys.contains(&k);
            if !taken && seen.insert(key.clone()) {
                order.push(key);
            }
        }
        if explain.is_none() {
            // Read after the scan: an id handed out before the scan is at most this value.
            let taken = crate::plans::select(
                client,
                IDS_TAKEN,
                None,
                &[outbox_sequence(client, schema)?.into()],
            )?
            .first()
            .get::<i64>(1)?;
            floor.advance(now, from, first_fresh, taken);
        }
        if order.is_empty() {
            return Ok(Vec::new());
        }
        // Probe as many resources as the batch has room for; only when some turn out busy
        // (backing off) are the next candidates probed to fill it. With a large backlog each
        // probe is a cache miss, so probing spares would cost the claim what it saves.
        let want = batch.max(1) as usize;
        let mut out: Vec<Claimed> = Vec::with_capacity(want);
        let mut next = 0;
        while out.len() < want && next < order.len() {
            let probe = &order[next..(next + want - out.len()).min(order.len())];
            next += probe.len();
            let tables: Vec<pg_sys::Oid> = probe.iter().map(|r| r.0).collect();
            let keys: Vec<String> = probe.iter().map(|r| r.1.clone()).collect();
            let args = [tables.into(), keys.into()];
            if let Some(plans) = explain.as_mut() {
                let sql = format!("EXPLAIN (ANALYZE, BUFFERS) {}", pending_of_sql(schema));
                plans.push("-- pending changes of the candidates".into());
                for row in client.select(sql.as_str(), None, &args)? {
                    plans.push(row.get::<String>(1)?.unwrap_or_default());
                }
            }
            let mut busy = std::collections::HashSet::new();
            let mut found: std::collections::HashMap<(pg_sys::Oid, String), Claimed> =
                std::collections::HashMap::new();
            for row in crate::plans::update(client, &pending_of_sql(schema), &args)? {
                let key = (
                    row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                    row.get::<String>(2)?.unwrap_or_default(),
                );
                if row.get::<bool>(4)?.unwrap_or(true) {
                    busy.insert(key);
                    continue;
                }
                let Some(id) = row.get::<i64>(3)? else {
                    continue;
                };
                let c = found.entry(key.clone()).or_insert_with(|| Claimed {
                    resource_table: key.0,
                    resource_key: key.1.clone(),
                    resource_type: String::new(),
                    outbox_ids: Vec::new(),
                    attempts: 0,
                    identifier: None,
                    age_s: 0.0,
                });
                let newest = c.outbox_ids.iter().all(|o| *o <= id);
                c.outbox_ids.push(id);
                c.resource_type = row.get::<String>(5)?.unwrap_or_default();
                c.attempts = c.attempts.max(row.get::<i32>(6)?.unwrap_or(0));
                c.age_s = c.age_s.max(row.get::<f64>(9)?.unwrap_or(0.0));
                // The newest identifier the trigger saw wins (a DELETE may need it).
                if let (Some(s), Some(v)) = (row.get::<String>(7)?, row.get::<String>(8)?) {
                    if newest {
                        c.identifier = Some((s, v));
                    }
                }
            }
            out.extend(
                probe
                    .iter()
                    .filter(|r| !busy.contains(*r))
                    .filter_map(|r| found.remove(r)),
            );
        }
        for c in &mut out {
            c.outbox_ids.sort_unstable();
        }
        if let Some(l) = leases.as_mut() {
            l.hold(&out, lease_ms);
        }
        Ok(out)
    })
}

pub fn claim(
    schema: &str,
    batch: i64,
    lease_ms: i64,
    exclude: &ResourcesInFlight,
    floor: &mut Floor,
    leases: Option<&mut Leases>,
) -> Result<Vec<Claimed>, FhirSyncError> {
    claim_with(schema, batch, lease_ms, exclude, floor, leases, None)
}
