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
#[derive(Clone)]
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

#[derive(Clone)]
struct Outbox {
    schema: String,
    relid: pg_sys::Oid,
    sequence: pg_sys::Oid,
    owner: pg_sys::Oid,
    natts: usize,
    columns: Columns,
}

thread_local! {
    static OUTBOX: RefCell<Option<Outbox>> = const { RefCell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Writes one outbox row in the current transaction.
pub fn insert(schema: &str, change: &Change) -> Result<(), FhirSyncError> {
    let outbox = cached(schema)?;
    if unsafe { write_as_owner(&outbox, change) } {
        return Ok(());
    }
    // Dropped and created again, or altered, since it was resolved: once more, afresh.
    let outbox = resolve(schema)?;
    if unsafe { write_as_owner(&outbox, change) } {
        return Ok(());
    }
    Err(FhirSyncError::Spi(
        "fhir_outbox does not have the shape fhir_sync writes".into(),
    ))
}

/// The outbox's identity sequence: the claim reads how far ids have been handed out.
pub fn sequence(schema: &str) -> Result<pg_sys::Oid, FhirSyncError> {
    Ok(cached(schema)?.sequence)
}

/// The outbox as resolved, copied out of the cache: opening the table processes invalidation
/// messages, which may clear it (forget).
fn cached(schema: &str) -> Result<Outbox, FhirSyncError> {
    match OUTBOX.with(|cell| cell.borrow().clone()) {
        Some(o) if o.schema == schema => Ok(o),
        _ => resolve(schema),
    }
}

/// Writes as the extension owner: the caller may write the tracked table but has no right to
/// the outbox's sequence. Transaction abort restores the identity on error.
unsafe fn write_as_owner(outbox: &Outbox, change: &Change) -> bool {
    let (mut user, mut sec) = (pg_sys::InvalidOid, 0i32);
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

/// Returns false, having written nothing, when the table is gone or its columns are not the
/// ones resolved.
unsafe fn write(outbox: &Outbox, change: &Change) -> bool {
    unsafe {
        let rel =
            pg_sys::try_table_open(outbox.relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return false;
        }
        let desc = (*rel).rd_att;
        if (*desc).natts as usize != outbox.natts {
            pg_sys::table_close(rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            return false;
        }
        let estate = pg_sys::CreateExecutorState();
        let caller_cxt = pg_sys::CurrentMemoryContext;
        pg_sys::CurrentMemoryContext = (*estate).es_query_cxt;

        let info: *mut pg_sys::ResultRelInfo =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()).cast();
        // Range table index 0: the relation is not in a range table (nothing here reads one;
        // an error report then names no inserted columns, as for a trigger's own relation).
        pg_sys::InitResultRelInfo(info, rel, 0, std::ptr::null_mut(), 0);
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
                pg_sys::Oid::from(pg_sys::F_NEXTVAL),
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

        pg_sys::ExecSimpleRelationInsert(info, estate, slot);

        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::ExecCloseIndices(info);
        pg_sys::CurrentMemoryContext = caller_cxt;
        pg_sys::FreeExecutorState(estate);
        // The lock is kept to the end of the transaction, as an INSERT's is.
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        true
    }
}

/// Finds the outbox, its owner and its identity sequence by catalog lookups in C: this runs in
/// the writer's session, under the writer's search_path, so it runs no SQL at all (an operator
/// planted ahead of pg_catalog on that path would otherwise run with the writer's rights).
fn resolve(schema: &str) -> Result<Outbox, FhirSyncError> {
    register_invalidation();
    let gone = || FhirSyncError::Spi(format!("{schema}.fhir_outbox does not exist"));
    let nsp_name = std::ffi::CString::new(schema).map_err(|_| gone())?;
    // SAFETY: catalog lookups by name and OID with missing_ok; the relation opened below is
    // closed before returning, and only its tuple descriptor and pg_class row are read.
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
        let attrs = (*desc).attrs.as_slice(natts);
        let find = |name: &str| {
            attrs
                .iter()
                .position(|a| {
                    !a.attisdropped
                        && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == name.as_bytes()
                })
                .ok_or_else(|| FhirSyncError::Spi(format!("fhir_outbox has no column \"{name}\"")))
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
            return Err(FhirSyncError::Spi(
                "fhir_outbox.id has no identity sequence".into(),
            ));
        }
        let columns = Columns {
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
        };
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let outbox = Outbox {
            schema: schema.to_string(),
            relid,
            sequence,
            owner,
            natts,
            columns,
        };
        OUTBOX.with(|cell| *cell.borrow_mut() = Some(outbox.clone()));
        Ok(outbox)
    }
}

fn register_invalidation() {
    CALLBACK_REGISTERED.with(|done| {
        if !done.get() {
            unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0)) };
            done.set(true);
        }
    });
}

/// Relcache invalidation: the outbox changed (or every relation did); resolve it again.
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
