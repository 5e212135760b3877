//! The capture trigger's one write: an outbox row, inserted straight through the executor's
//! single-row entry point (`ExecSimpleRelationInsert`, the one logical replication's apply
//! worker uses) instead of an SPI statement.
//!
//! Why: through SPI every captured row paid for an executor start-up of the prepared INSERT (a
//! ModifyTable node, a 24-column projection, three default expressions evaluated through the
//! function manager), about half of the capture's cost. Here the row is formed in place and only
//! what the table needs is done: the heap insert, the NOT NULL checks, the index entries (partial
//! index predicates included).
//!
//! What the table's defaults would compute is computed here, the same way: `id` from its
//! identity sequence (as the extension owner: writers have no right to it), `txid` as
//! txid_current(), `created_at` as clock_timestamp(), `processed` false, `attempts` 0. Columns
//! are found by name, so a later version that adds a nullable column needs nothing here; one
//! that adds a NOT NULL column without setting it here fails the NOT NULL check, loudly.
//!
//! The outbox's oids and column positions are resolved once per backend and forgotten when its
//! relcache entry is invalidated (ALTER TABLE, DROP EXTENSION, a cache reset).

use crate::error::FhirSyncError;
use pgrx::{pg_sys, IntoDatum};
use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::rc::Rc;

/// One outbox row as the trigger sees it.
pub struct Change<'a> {
    pub table_name: &'a str,
    pub record_id: &'a str,
    pub operation: char,
    pub resource_type: &'a str,
    pub resource_table: pg_sys::Oid,
    pub resource_key: &'a str,
    pub identifier_system: Option<&'a str>,
    pub identifier_value: Option<&'a str>,
    /// The row as JSON text (fhir_sync.capture_payload).
    pub payload: Option<&'a str>,
}

/// Positions (0-based) of the columns the trigger fills.
struct Columns {
    id: usize,
    txid: usize,
    table_name: usize,
    record_id: usize,
    operation: usize,
    resource_type: usize,
    resource_table: usize,
    resource_key: usize,
    payload_json: usize,
    identifier_system: usize,
    identifier_value: usize,
    created_at: usize,
    processed: usize,
    attempts: usize,
}

struct Outbox {
    schema: String,
    relid: pg_sys::Oid,
    sequence: pg_sys::Oid,
    owner: pg_sys::Oid,
    natts: usize,
    /// Each attribute's type (InvalidOid for a dropped one): a cached layout is used only while
    /// the table's descriptor still has exactly these (ALTER COLUMN … TYPE keeps natts).
    types: Vec<pg_sys::Oid>,
    columns: Columns,
}

thread_local! {
    // Shared, not copied, with each captured row (an Rc: no allocation per row).
    static OUTBOX: RefCell<Option<Rc<Outbox>>> = const { RefCell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Writes one outbox row in the current transaction.
///
/// Only from the capture trigger (an AFTER ROW trigger, so inside a running query of a
/// writable transaction, on the main thread): it inserts at the current command id, and an
/// AFTER trigger on the outbox could only be queued inside a query.
pub fn insert(schema: &str, change: &Change) -> Result<(), FhirSyncError> {
    let outbox = cached(schema)?;
    // SAFETY: called from the capture trigger (see above); `outbox` was resolved from the
    // catalogs, and `write` re-checks it against the relation it opens (natts only: see write).
    if unsafe { write_as_owner(&outbox, change) } {
        return Ok(());
    }
    // Dropped and created again, or altered, since it was resolved: once more, afresh.
    let outbox = resolve(schema)?;
    // SAFETY: as above, with the outbox just resolved in this transaction.
    if unsafe { write_as_owner(&outbox, change) } {
        return Ok(());
    }
    Err(FhirSyncError::Broken(
        "fhir_outbox does not have the shape fhir_sync writes".into(),
    ))
}

/// The outbox as resolved, shared out of the cache: opening the table processes invalidation
/// messages, which may clear it (forget).
fn cached(schema: &str) -> Result<Rc<Outbox>, FhirSyncError> {
    match OUTBOX.with(|cell| cell.borrow().clone()) {
        Some(o) if o.schema == schema => Ok(o),
        _ => resolve(schema),
    }
}

/// Writes as the extension owner: the caller may write the tracked table but has no right to
/// the outbox's sequence. Transaction abort restores the identity on error.
///
/// # Safety
/// As for `write`.
// SAFETY: upheld by `insert`, its only caller.
unsafe fn write_as_owner(outbox: &Outbox, change: &Change) -> bool {
    let (mut user, mut sec) = (pg_sys::InvalidOid, 0i32);
    // SAFETY: the user id is backend-local; restored below, and on ERROR by the (sub)transaction
    // abort, which resets it to the identity saved when that (sub)transaction began.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
        pg_sys::SetUserIdAndSecContext(
            outbox.owner,
            sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let written = write(outbox, change);
        pg_sys::SetUserIdAndSecContext(user, sec);
        written
    }
}

fn text(s: &str) -> Option<pg_sys::Datum> {
    s.into_datum()
}

/// Returns false, having written nothing, when the table is gone or its number of columns is
/// not the one resolved (the only check of the columns: see below).
///
/// # Safety
/// A writable transaction, inside a running query (the capture trigger), on the main thread;
/// `outbox` resolved by `resolve` (its layout is checked against the open table here).
// SAFETY: upheld by write_as_owner's caller, `insert`.
unsafe fn write(outbox: &Outbox, change: &Change) -> bool {
    // SAFETY: the table is opened (RowExclusiveLock) and checked to be a plain table before its
    // descriptor is read; the slot's arrays have natts entries (checked equal to outbox.natts);
    // every datum, the ResultRelInfo and (PostgreSQL 13) the range table are allocated in
    // es_query_cxt, used only until FreeExecutorState, and the heap insert copies the row. The
    // cached positions are used only while every attribute still has the type resolved
    // (attribute_types).
    unsafe {
        // try_relation_open, not try_table_open: PostgreSQL 13 has only the former. The kind is
        // checked here: the oid may name something else by now.
        let rel =
            pg_sys::try_relation_open(outbox.relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return false;
        }
        let desc = (*rel).rd_att;
        if (*(*rel).rd_rel).relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
            || (*desc).natts as usize != outbox.natts
            || !same_types(desc, &outbox.types)
        {
            pg_sys::table_close(rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            return false;
        }
        let estate = pg_sys::CreateExecutorState();
        let caller_cxt = pg_sys::CurrentMemoryContext;
        pg_sys::CurrentMemoryContext = (*estate).es_query_cxt;

        let info: *mut pg_sys::ResultRelInfo =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()).cast();
        pg_sys::InitResultRelInfo(info, rel, range_table(estate, rel), std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(info, false);
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);

        let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsVirtual);
        let values = std::slice::from_raw_parts_mut((*slot).tts_values, outbox.natts);
        let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, outbox.natts);
        nulls.fill(true);
        let c = &outbox.columns;
        let mut set = |at: usize, d: Option<pg_sys::Datum>| {
            if let Some(d) = d {
                values[at] = d;
                nulls[at] = false;
            }
        };
        set(
            c.id,
            Some(pg_sys::OidFunctionCall1Coll(
                NEXTVAL,
                pg_sys::InvalidOid,
                outbox.sequence.into_datum().expect("an oid datum"),
            )),
        );
        let txid = pg_sys::GetTopFullTransactionId().value as i64;
        set(c.txid, txid.into_datum());
        set(c.table_name, text(change.table_name));
        set(c.record_id, text(change.record_id));
        set(c.operation, text(change.operation.encode_utf8(&mut [0; 4])));
        set(c.resource_type, text(change.resource_type));
        set(c.resource_table, change.resource_table.into_datum());
        set(c.resource_key, text(change.resource_key));
        set(c.identifier_system, change.identifier_system.and_then(text));
        set(c.identifier_value, change.identifier_value.and_then(text));
        if let Some(p) = change.payload {
            let json = std::ffi::CString::new(p).unwrap_or_default();
            set(
                c.payload_json,
                Some(pg_sys::OidFunctionCall1Coll(
                    pg_sys::Oid::from(pg_sys::F_JSONB_IN),
                    pg_sys::InvalidOid,
                    json.as_c_str().into_datum().expect("a cstring datum"),
                )),
            );
        }
        set(c.created_at, pg_sys::GetCurrentTimestamp().into_datum());
        set(c.processed, false.into_datum());
        set(c.attempts, 0i32.into_datum());
        pg_sys::ExecStoreVirtualTuple(slot);

        insert_slot(info, estate, slot);

        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::ExecCloseIndices(info);
        pg_sys::CurrentMemoryContext = caller_cxt;
        pg_sys::FreeExecutorState(estate);
        // The lock is kept to the end of the transaction, as an INSERT's is.
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        true
    }
}

/// nextval(regclass), under the name each version gives it.
#[cfg(feature = "pg13")]
const NEXTVAL: pg_sys::Oid = pg_sys::F_NEXTVAL_OID;
#[cfg(not(feature = "pg13"))]
const NEXTVAL: pg_sys::Oid = pg_sys::Oid::from_u32(pg_sys::F_NEXTVAL);

/// The range-table index to give the outbox's ResultRelInfo. From PostgreSQL 14 none is needed:
/// index 0 says the relation is not in a range table (an error report then names no inserted
/// columns, as for a trigger's own relation). PostgreSQL 13's constraint-failure report reads
/// the entry unconditionally, so there the outbox gets a one-entry range table, as logical
/// replication's apply worker builds.
///
/// # Safety
/// `estate` fresh from CreateExecutorState, in its query context; `rel` open.
// SAFETY: upheld by `write`, its only caller.
#[cfg(feature = "pg13")]
unsafe fn range_table(estate: *mut pg_sys::EState, rel: pg_sys::Relation) -> pg_sys::Index {
    // SAFETY: the entry is palloc0'd in the executor's context, tagged as a RangeTblEntry and
    // given the fields a relation entry needs; the list holds that one pointer.
    unsafe {
        let rte: *mut pg_sys::RangeTblEntry =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()).cast();
        (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
        (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
        (*rte).relid = (*rel).rd_id;
        (*rte).relkind = pg_sys::RELKIND_RELATION as std::ffi::c_char;
        (*rte).rellockmode = pg_sys::RowExclusiveLock as i32;
        let mut list = pgrx::PgList::<pg_sys::RangeTblEntry>::new();
        list.push(rte);
        pg_sys::ExecInitRangeTable(estate, list.into_pg());
    }
    1
}

// SAFETY: nothing to uphold (it reads neither argument).
#[cfg(not(feature = "pg13"))]
unsafe fn range_table(_estate: *mut pg_sys::EState, _rel: pg_sys::Relation) -> pg_sys::Index {
    0
}

/// Inserts the slot's row and its index entries. PostgreSQL 13 takes the result relation from
/// the executor state; later versions as an argument.
///
/// # Safety
/// `info` initialised for `estate` (InitResultRelInfo, indices open), the slot filled.
// SAFETY: upheld by `write`, its only caller.
#[cfg(feature = "pg13")]
unsafe fn insert_slot(
    info: *mut pg_sys::ResultRelInfo,
    estate: *mut pg_sys::EState,
    slot: *mut pg_sys::TupleTableSlot,
) {
    // SAFETY: `info` lives in the estate's query context, and the estate is freed right after
    // this insert: the pointers stored here never outlive what they point at.
    unsafe {
        (*estate).es_result_relations = info;
        (*estate).es_num_result_relations = 1;
        (*estate).es_result_relation_info = info;
        pg_sys::ExecSimpleRelationInsert(estate, slot);
    }
}

// SAFETY: upheld by `write`, its only caller.
#[cfg(not(feature = "pg13"))]
unsafe fn insert_slot(
    info: *mut pg_sys::ResultRelInfo,
    estate: *mut pg_sys::EState,
    slot: *mut pg_sys::TupleTableSlot,
) {
    // SAFETY: as the caller's contract states.
    unsafe { pg_sys::ExecSimpleRelationInsert(info, estate, slot) }
}

/// Finds the outbox, its owner and its identity sequence by catalog lookups in C: this runs in
/// the writer's session, under the writer's search_path, so it runs no SQL at all (an operator
/// planted ahead of pg_catalog on that path would otherwise run with the writer's rights).
/// Only inside a transaction, on the main thread: not checked here.
fn resolve(schema: &str) -> Result<Rc<Outbox>, FhirSyncError> {
    register_invalidation();
    let gone = || FhirSyncError::Broken(format!("{schema}.fhir_outbox does not exist"));
    let nsp_name = std::ffi::CString::new(schema).map_err(|_| gone())?;
    // SAFETY: a transaction is in progress (trigger or worker transaction); name lookups return
    // InvalidOid when missing (checked), and table_open raises an ERROR, never returns null.
    // Only the open relation's descriptor and pg_class row are read, and the `find(..)?` returns
    // below leave it open: no UB (the resource owner closes it; a commit warns of the leak).
    unsafe {
        let nsp = pg_sys::get_namespace_oid(nsp_name.as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return Err(gone());
        }
        let relid = pg_sys::get_relname_relid(c"fhir_outbox".as_ptr(), nsp);
        if relid == pg_sys::InvalidOid {
            return Err(gone());
        }
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let owner = (*(*rel).rd_rel).relowner;
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let types = attribute_types(desc);
        let attrs = attributes(desc);
        let find = |name: &str| {
            attrs
                .iter()
                .position(|a| {
                    !a.attisdropped
                        && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == name.as_bytes()
                })
                .ok_or_else(|| {
                    FhirSyncError::Broken(format!("fhir_outbox has no column \"{name}\""))
                })
        };
        let id_attnum = match find("id") {
            Ok(i) => (i + 1) as pg_sys::AttrNumber,
            Err(e) => {
                pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                return Err(e);
            }
        };
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
        let sequence = pg_sys::getIdentitySequence(relid, id_attnum, true);
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
        let sequence = pg_sys::getIdentitySequence(rel, id_attnum, true);
        if sequence == pg_sys::InvalidOid {
            pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            return Err(FhirSyncError::Broken(
                "fhir_outbox.id has no identity sequence".into(),
            ));
        }
        let columns = (|| {
            Ok::<_, FhirSyncError>(Columns {
                id: find("id")?,
                txid: find("txid")?,
                table_name: find("table_name")?,
                record_id: find("record_id")?,
                operation: find("operation")?,
                resource_type: find("resource_type")?,
                resource_table: find("resource_table")?,
                resource_key: find("resource_key")?,
                payload_json: find("payload_json")?,
                identifier_system: find("identifier_system")?,
                identifier_value: find("identifier_value")?,
                created_at: find("created_at")?,
                processed: find("processed")?,
                attempts: find("attempts")?,
            })
        })();
        // Closed before a missing column is reported: an early return would leak the reference.
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let columns = columns?;
        let outbox = Outbox {
            schema: schema.to_string(),
            relid,
            sequence,
            owner,
            natts,
            types,
            columns,
        };
        let outbox = Rc::new(outbox);
        OUTBOX.with(|cell| *cell.borrow_mut() = Some(Rc::clone(&outbox)));
        Ok(outbox)
    }
}

/// The attributes of a tuple descriptor. PostgreSQL 18 keeps them after the descriptor's compact
/// form (reached through TupleDescAttr); earlier versions in the `attrs` array.
///
/// # Safety
/// `desc` is the descriptor of a relation this backend holds open; the slice must not outlive it.
// SAFETY: callers pass the descriptor of the outbox they hold open and use the slice meanwhile.
unsafe fn attributes<'a>(desc: pg_sys::TupleDesc) -> &'a [pg_sys::FormData_pg_attribute] {
    // SAFETY: natts attributes stand contiguously from the first one in every version.
    unsafe {
        let n = (*desc).natts as usize;
        #[cfg(feature = "pg18")]
        {
            if n == 0 {
                return &[];
            }
            std::slice::from_raw_parts(pg_sys::TupleDescAttr(desc, 0), n)
        }
        #[cfg(not(feature = "pg18"))]
        {
            (*desc).attrs.as_slice(n)
        }
    }
}

/// The type of each attribute of `desc` (InvalidOid for a dropped one).
///
/// # Safety
/// `desc` is the descriptor of a relation this backend holds open.
// SAFETY: both callers (write, resolve) pass the descriptor of the outbox they hold open.
unsafe fn attribute_types(desc: pg_sys::TupleDesc) -> Vec<pg_sys::Oid> {
    // SAFETY: the caller holds the relation open, so its descriptor has natts attributes.
    unsafe { attributes(desc).iter().map(type_of).collect() }
}

fn type_of(a: &pg_sys::FormData_pg_attribute) -> pg_sys::Oid {
    if a.attisdropped {
        pg_sys::InvalidOid
    } else {
        a.atttypid
    }
}

/// Whether `desc`'s attributes have exactly `types` (compared in place: this runs per captured
/// row).
///
/// # Safety
/// As for `attribute_types`.
// SAFETY: `write` passes the descriptor of the outbox it holds open.
unsafe fn same_types(desc: pg_sys::TupleDesc, types: &[pg_sys::Oid]) -> bool {
    // SAFETY: as in attribute_types.
    let attrs = unsafe { attributes(desc) };
    attrs.len() == types.len() && attrs.iter().zip(types).all(|(a, t)| type_of(a) == *t)
}

fn register_invalidation() {
    CALLBACK_REGISTERED.with(|done| {
        if !done.get() {
            // SAFETY: once per backend (the thread-local flag), so at most one of the
            // MAX_RELCACHE_CALLBACKS slots; `forget` is a static fn.
            unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0)) };
            done.set(true);
        }
    });
}

/// Relcache invalidation: the outbox changed (or every relation did); resolve it again.
///
/// Not #[pg_guard]ed: it must not panic. Its borrow_mut cannot fail, as OUTBOX is never
/// borrowed across a PostgreSQL call, the only place invalidations are processed.
// SAFETY: called only by PostgreSQL's invalidation processing, on the main thread; it reads
// its arguments by value and touches only the thread-local cache.
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    OUTBOX.with(|cell| {
        let mut cell = cell.borrow_mut();
        let hit = cell
            .as_ref()
            .map(|o| relid == pg_sys::InvalidOid || relid == o.relid || relid == o.sequence)
            .unwrap_or(false);
        if hit {
            *cell = None;
        }
    });
}
