//! The ProcessUtility hook: the few utility statements fhir_sync must react to.
//!
//! - DROP DATABASE / ALTER DATABASE … RENAME: our worker is connected to that database and would
//!   make the command fail with "database is being accessed by other users"; ask it to leave.
//! - COMMIT PREPARED: the changes a prepared transaction captured become visible now, in a
//!   session that captured nothing itself; wake the workers as a capturing commit would.

use crate::shmem;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

pub fn install() {
    unsafe {
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(utility_hook);
    }
}

unsafe fn before(stmt: *mut pg_sys::Node) {
    unsafe {
        if stmt.is_null() {
            return;
        }
        release_database(database_named_by(stmt));
        if (*stmt).type_ == pg_sys::NodeTag::T_TransactionStmt
            && (*(stmt as *mut pg_sys::TransactionStmt)).kind
                == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED
        {
            crate::capture::announce_changes();
        }
    }
}

/// Asks the workers of a database that is about to be dropped or renamed to leave it, so the
/// command does not fail with "database is being accessed by other users".
fn release_database(name: *const std::ffi::c_char) {
    if name.is_null() {
        return;
    }
    let oid = unsafe { pg_sys::get_database_oid(name, true) };
    if oid == pg_sys::InvalidOid {
        return;
    }
    let Some(s) = shmem::shared() else { return };
    s.db_hold_oid.store(oid.to_u32(), Ordering::Release);
    s.db_hold_until_ms
        .store(shmem::now_ms() + 15_000, Ordering::Release);
    for w in &s.workers {
        if w.pid.load(Ordering::Acquire) != 0 && w.db_oid.load(Ordering::Acquire) == oid.to_u32() {
            w.leave.store(true, Ordering::Release);
        }
    }
    shmem::wake_database(oid);
    // Give them a moment: DROP DATABASE checks for other sessions for five seconds.
    for _ in 0..50 {
        if !s.workers.iter().any(|w| {
            w.pid.load(Ordering::Acquire) != 0 && w.db_oid.load(Ordering::Acquire) == oid.to_u32()
        }) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

unsafe fn database_named_by(stmt: *mut pg_sys::Node) -> *const std::ffi::c_char {
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_DropdbStmt => (*(stmt as *mut pg_sys::DropdbStmt)).dbname,
            pg_sys::NodeTag::T_RenameStmt => {
                let r = stmt as *mut pg_sys::RenameStmt;
                if (*r).renameType == pg_sys::ObjectType::OBJECT_DATABASE {
                    (*r).subname
                } else {
                    std::ptr::null()
                }
            }
            _ => std::ptr::null(),
        }
    }
}

#[cfg(not(feature = "pg13"))]
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn utility_hook(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        before((*pstmt).utilityStmt);
        match PREV_UTILITY {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                env,
                dest,
                qc,
            ),
        }
    }
}

#[cfg(feature = "pg13")]
#[pg_guard]
unsafe extern "C-unwind" fn utility_hook(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        before((*pstmt).utilityStmt);
        match PREV_UTILITY {
            Some(prev) => prev(pstmt, query, context, params, env, dest, qc),
            None => pg_sys::standard_ProcessUtility(pstmt, query, context, params, env, dest, qc),
        }
    }
}
