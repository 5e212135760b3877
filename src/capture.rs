//! Change capture: the AFTER ROW trigger that writes one fhir_outbox row per change, in the
//! writer's own transaction, and the commit callback that wakes the workers.
//!
//! The trigger runs no SQL and resolves nothing through search_path: it writes the outbox row
//! straight through the executor (outbox_write.rs), as the extension owner for that insert
//! only, so any role that may write a tracked table may capture, while no ordinary role may
//! write the outbox directly.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::{CStr, CString};

use crate::error::FhirSyncError;

/// Trigger arguments written by `fhir_track` (see sql/track.sql): the positions are part of the
/// extension's on-disk format, because every tracked table's trigger carries them.
struct TriggerArgs {
    schema: String,
    resource_type: String,
    key_column: CString,
    /// Set for child tables (patient_other_identifiers): the change belongs to the parent row.
    parent: Option<(pg_sys::Oid, CString)>,
    /// The patient mapper's own identifier columns are captured so a DELETE can address the
    /// resource even if it was never synced.
    captures_identifier: bool,
}

impl TriggerArgs {
    fn parse(args: &[String]) -> Result<Self, FhirSyncError> {
        let bad = || FhirSyncError::BadTrigger(args.len());
        if args.len() != 6 {
            return Err(bad());
        }
        let cstr = |s: &str| CString::new(s).map_err(|_| bad());
        let parent = if args[3].is_empty() {
            None
        } else {
            let oid: u32 = args[3].parse().map_err(|_| bad())?;
            Some((pg_sys::Oid::from(oid), cstr(&args[4])?))
        };
        Ok(TriggerArgs {
            schema: args[0].clone(),
            resource_type: args[1].clone(),
            key_column: cstr(&args[2])?,
            parent,
            captures_identifier: args[5] == "patient",
        })
    }
}

thread_local! {
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Set when this transaction captured a change; read and cleared at commit or abort.
static mut CAPTURED_IN_XACT: bool = false;

/// The capture trigger. Correct only as the AFTER ROW INSERT/UPDATE/DELETE trigger `fhir_track`
/// creates, so it refuses to run otherwise: fired BEFORE ROW, its NULL result would skip the row
/// while the outbox row is written.
#[pg_trigger]
fn fhir_capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, FhirSyncError> {
    // Raised here with its SQLSTATE, message and hint: an Err returned to #[pg_trigger] would
    // become an XX000 "Trigger function panic" carrying the error's Debug form.
    capture(trigger).or_else(|e| e.report())
}

fn capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, FhirSyncError> {
    let args = TriggerArgs::parse(
        &trigger
            .extra_args()
            .map_err(|_| FhirSyncError::BadTrigger(0))?,
    )?;
    if !matches!(trigger.when(), Ok(PgTriggerWhen::After))
        || !matches!(trigger.level(), PgTriggerLevel::Row)
    {
        return Err(FhirSyncError::NotAfterRow);
    }
    let data = trigger.trigger_data();
    let op = match trigger.op() {
        Ok(PgTriggerOperation::Insert) => 'I',
        Ok(PgTriggerOperation::Update) => 'U',
        Ok(PgTriggerOperation::Delete) => 'D',
        _ => return Ok(None),
    };
    let rel = data.tg_relation;
    // SAFETY: #[pg_trigger] runs this only when fcinfo->context is TriggerData, whose
    // tg_relation is the relation the trigger fired on, open and locked for this whole call.
    let (relid, tupdesc) = unsafe { ((*rel).rd_id, (*rel).rd_att) };
    // SAFETY: the same open relation; a transaction is in progress, as for every trigger call.
    let table_name = unsafe { qualified_name(rel) };
    // INSERT and DELETE carry their row in trigtuple; UPDATE has the old row there and the new
    // one in newtuple.
    let (old, new) = match op {
        'I' => (None, Some(data.tg_trigtuple)),
        'U' => (Some(data.tg_trigtuple), Some(data.tg_newtuple)),
        _ => (Some(data.tg_trigtuple), None),
    };
    let current = new.or(old).unwrap_or(std::ptr::null_mut());
    // SAFETY: for a row trigger tg_trigtuple (and, for UPDATE, tg_newtuple) are rows of
    // tg_relation, valid for this call; null (a statement trigger) is checked in column_text.
    let record_id = unsafe { column_text(current, tupdesc, &args.key_column) }
        .ok_or(FhirSyncError::NullKey(table_name.clone()))?;

    let payload = if crate::gucs::capture_payload() {
        // SAFETY: `current` as above: a row of tg_relation shaped by its tupdesc, or null.
        unsafe { row_json(current, tupdesc) }
    } else {
        None
    };

    let mut targets: Vec<(pg_sys::Oid, String)> = Vec::with_capacity(2);
    match &args.parent {
        None => targets.push((relid, record_id.clone())),
        Some((parent_rel, parent_col)) => {
            // A child row that moves from one parent to another changes both parents.
            for tuple in [old, new].into_iter().flatten() {
                // SAFETY: the trigger's own old/new rows, described by tupdesc, or null.
                if let Some(key) = unsafe { column_text(tuple, tupdesc, parent_col) } {
                    if !targets.iter().any(|(_, k)| *k == key) {
                        targets.push((*parent_rel, key));
                    }
                }
            }
        }
    }
    let (identifier_system, identifier_value) = if args.captures_identifier {
        // For a DELETE the old row is all that is left of the resource's identity.
        let tuple = old.filter(|_| op == 'D').unwrap_or(current);
        // SAFETY: both calls read the trigger's own row (tg_trigtuple or tg_newtuple, or null)
        // through tg_relation's tupdesc, all valid for this call.
        unsafe {
            (
                column_text(tuple, tupdesc, c"identifier_system"),
                column_text(tuple, tupdesc, c"identifier_value"),
            )
        }
    } else {
        (None, None)
    };

    // A change to a child row updates its parent; it never deletes the parent resource.
    let operation = if args.parent.is_some() { 'U' } else { op };
    for (resource_table, resource_key) in &targets {
        crate::outbox_write::insert(
            &args.schema,
            &crate::outbox_write::Change {
                table_name: &table_name,
                record_id: &record_id,
                operation,
                resource_type: &args.resource_type,
                resource_table: *resource_table,
                resource_key,
                identifier_system: identifier_system.as_deref(),
                identifier_value: identifier_value.as_deref(),
                payload: payload.as_deref(),
            },
        )?;
    }
    // SAFETY: CAPTURED_IN_XACT is touched only on the backend's main thread (this trigger,
    // announce_changes, on_xact_event), so there is no concurrent access.
    unsafe { CAPTURED_IN_XACT = true };
    register_commit_callback();
    Ok(None)
}

/// A column of a tuple in its text form (whatever its type), or None when NULL or absent.
///
/// # Safety
/// `tuple` is null or a valid heap tuple described by `tupdesc`; a transaction is in progress
/// (the column's output function runs).
// SAFETY: its callers, all in fhir_capture, pass the trigger's own rows and tupdesc.
unsafe fn column_text(
    tuple: *mut pg_sys::HeapTupleData,
    tupdesc: pg_sys::TupleDesc,
    column: &CStr,
) -> Option<String> {
    if tuple.is_null() {
        return None;
    }
    // SAFETY: tuple and tupdesc per the contract; SPI_fnumber/SPI_getvalue need no SPI
    // connection, and the palloc'd text from SPI_getvalue is copied out before it is freed.
    unsafe {
        let attnum = pg_sys::SPI_fnumber(tupdesc, column.as_ptr());
        if attnum <= 0 {
            return None;
        }
        let value = pg_sys::SPI_getvalue(tuple, tupdesc, attnum);
        if value.is_null() {
            return None;
        }
        let s = CStr::from_ptr(value).to_string_lossy().into_owned();
        pg_sys::pfree(value.cast());
        Some(s)
    }
}

/// The row as JSON text, for the optional payload_json copy.
///
/// # Safety
/// As for `column_text`: `tuple` is null or a heap tuple described by `tupdesc`, in a
/// transaction.
// SAFETY: its one caller, fhir_capture, passes the trigger's own row and tupdesc.
unsafe fn row_json(
    tuple: *mut pg_sys::HeapTupleData,
    tupdesc: pg_sys::TupleDesc,
) -> Option<String> {
    if tuple.is_null() {
        return None;
    }
    // SAFETY: heap_copy_tuple_as_datum makes a self-describing composite datum (type id
    // stamped, toasted fields inlined), which is what row_to_json(record) reads.
    unsafe {
        let datum = pg_sys::heap_copy_tuple_as_datum(tuple, tupdesc);
        // row_to_json(record), by OID: it reads the row type from the datum itself.
        const ROW_TO_JSON: u32 = 3155;
        let json =
            pg_sys::OidFunctionCall1Coll(pg_sys::Oid::from(ROW_TO_JSON), pg_sys::InvalidOid, datum);
        String::from_datum(json, false)
    }
}

/// # Safety
/// `rel` is an open relation; a transaction is in progress (pg_namespace syscache lookup).
// SAFETY: its one caller passes the trigger's tg_relation.
unsafe fn qualified_name(rel: pg_sys::Relation) -> String {
    // SAFETY: per the contract; get_namespace_name returns a palloc'd name or null (checked).
    unsafe {
        let nsp = pg_sys::get_namespace_name((*(*rel).rd_rel).relnamespace);
        let name = CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy();
        if nsp.is_null() {
            name.into_owned()
        } else {
            format!("{}.{}", CStr::from_ptr(nsp).to_string_lossy(), name)
        }
    }
}

fn register_commit_callback() {
    CALLBACK_REGISTERED.with(|done| {
        if !done.get() {
            // SAFETY: once per backend (the thread-local flag), on its main thread; the callback
            // is a static fn, kept by RegisterXactCallback in TopMemoryContext.
            unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
            done.set(true);
        }
    });
}

/// Wakes the workers once the changes are visible to them. A rollback or a PREPARE clears the
/// flag: COMMIT PREPARED wakes the workers itself (utility.rs).
///
/// Not #[pg_guard]ed: it must not panic (it would unwind into xact.c), and nothing in it can.
// SAFETY: called only by PostgreSQL's CallXactCallbacks, on the main thread; at COMMIT the
// transaction is already committed, so it may not fail: it only touches atomics and SetLatch.
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    // SAFETY: CAPTURED_IN_XACT and MyDatabaseId are main-thread backend state, and this runs
    // on the main thread.
    unsafe {
        match event {
            XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT if CAPTURED_IN_XACT => {
                CAPTURED_IN_XACT = false;
                crate::shmem::wake_database(pg_sys::MyDatabaseId);
            }
            XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
                CAPTURED_IN_XACT = false;
            }
            _ => {}
        }
    }
}

/// Makes the current transaction wake the workers at commit, as a capture does.
pub fn announce_changes() {
    // SAFETY: main-thread only, like every access to CAPTURED_IN_XACT (the utility hook).
    unsafe { CAPTURED_IN_XACT = true };
    register_commit_callback();
}
