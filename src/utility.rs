//! The ProcessUtility hook: the few utility statements fhir_sync must react to.
//!
//! - DROP DATABASE / ALTER DATABASE … RENAME: our worker is connected to that database and would
//!   make the command fail with "database is being accessed by other users"; ask it to leave —
//!   but only when PostgreSQL will let this user run the command: the hook runs before
//!   PostgreSQL's own checks, and a role that may not drop the database must not be able to
//!   stop its delivery by trying, over and over.
//! - COMMIT PREPARED: the changes a prepared transaction captured become visible now, in a
//!   session that captured nothing itself; wake the workers as a capturing commit would.

use crate::shmem;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Only from _PG_init (through launcher::register), in the postmaster.
pub fn install() {
    // SAFETY: _PG_init runs single-threaded in the postmaster before any backend exists: the
    // chain is linked once and inherited by every child.
    unsafe {
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(utility_hook);
    }
}

/// # Safety
/// `stmt` is null or a valid parse node; a transaction is in progress, as ProcessUtility always
/// runs in one (in an aborted one only COMMIT, ROLLBACK or PREPARE get here: no lookups).
// SAFETY: upheld by utility_hook, which passes PostgreSQL's own utilityStmt.
unsafe fn before(stmt: *mut pg_sys::Node, context: pg_sys::ProcessUtilityContext::Type) {
    // SAFETY: per the contract; each cast follows the node's tag.
    unsafe {
        if stmt.is_null() {
            return;
        }
        let (name, rename) = database_named_by(stmt);
        // DROP DATABASE refuses to run inside a transaction block or a function: it would fail
        // after the workers had left.
        let top_level = context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL;
        if rename || (top_level && !pg_sys::IsTransactionBlock()) {
            release_database(name, rename);
        }
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
/// `name` must be null or a NUL-terminated string (the parse tree's): a safe fn that does not
/// enforce it, so only `before` may call it. Inside ProcessUtility's transaction.
fn release_database(name: *const std::ffi::c_char, rename: bool) {
    if name.is_null() {
        return;
    }
    // SAFETY: name is the parse tree's NUL-terminated database name; missing_ok = true; inside
    // ProcessUtility's transaction, which the pg_database lookup needs.
    let oid = unsafe { pg_sys::get_database_oid(name, true) };
    if oid == pg_sys::InvalidOid || !may_drop_or_rename(oid, rename) {
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

/// What PostgreSQL demands before it drops or renames a database: the current user has the
/// privileges of its owner (superusers do), it is not the database this session is connected
/// to; for DROP it is not a template, for RENAME the user may create databases. Anything else
/// fails the command anyway.
fn may_drop_or_rename(db: pg_sys::Oid, rename: bool) -> bool {
    // SAFETY: pg_database's and pg_authid's syscaches by OID, read as their FormData structs,
    // in ProcessUtility's transaction; MyDatabaseId and GetUserId read backend-local state.
    unsafe {
        if db == pg_sys::MyDatabaseId {
            return false;
        }
        let Some((owner, template)) = crate::catalog::row(
            pg_sys::SysCacheIdentifier::DATABASEOID,
            db.into(),
            |d: &pg_sys::FormData_pg_database| (d.datdba, d.datistemplate),
        ) else {
            return false;
        };
        let user = pg_sys::GetUserId();
        if !pg_sys::has_privs_of_role(user, owner) {
            return false;
        }
        if rename {
            // CREATEDB, as ALTER DATABASE … RENAME demands (superusers have it).
            pg_sys::superuser_arg(user)
                || crate::catalog::row(
                    pg_sys::SysCacheIdentifier::AUTHOID,
                    user.into(),
                    |r: &pg_sys::FormData_pg_authid| r.rolcreatedb,
                )
                .unwrap_or(false)
        } else {
            !template
        }
    }
}

/// The database a DROP DATABASE or ALTER DATABASE … RENAME names, and whether it is a rename.
///
/// # Safety
/// `stmt` is a valid, non-null parse node; the name returned lives as long as the parse tree.
// SAFETY: its one caller, `before`, has checked stmt for null.
unsafe fn database_named_by(stmt: *mut pg_sys::Node) -> (*const std::ffi::c_char, bool) {
    // SAFETY: per the contract; each node is read as the struct its tag names.
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_DropdbStmt => ((*(stmt as *mut pg_sys::DropdbStmt)).dbname, false),
            pg_sys::NodeTag::T_RenameStmt => {
                let r = stmt as *mut pg_sys::RenameStmt;
                if (*r).renameType == pg_sys::ObjectType::OBJECT_DATABASE {
                    ((*r).subname, true)
                } else {
                    (std::ptr::null(), false)
                }
            }
            _ => (std::ptr::null(), false),
        }
    }
}

#[cfg(not(feature = "pg13"))]
#[pg_guard]
#[allow(clippy::too_many_arguments)]
// SAFETY: PostgreSQL calls it only as ProcessUtility_hook, on the main thread, with the
// arguments ProcessUtility itself received (pstmt non-null).
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
    // SAFETY: pstmt is ProcessUtility's own; PREV_UTILITY was written once in install(), before
    // any backend; the arguments are passed down the chain unchanged.
    unsafe {
        before((*pstmt).utilityStmt, context);
        match PREV_UTILITY {
            // A hook further down the chain is C: guard its ERRORs like any call into PostgreSQL.
            Some(prev) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                prev(pstmt, query, read_only_tree, context, params, env, dest, qc)
            }),
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
// SAFETY: PostgreSQL calls it only as ProcessUtility_hook, on the main thread, with the
// arguments ProcessUtility itself received (pstmt non-null).
unsafe extern "C-unwind" fn utility_hook(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: pstmt is ProcessUtility's own; PREV_UTILITY was written once in install(), before
    // any backend; the arguments are passed down the chain unchanged.
    unsafe {
        before((*pstmt).utilityStmt, context);
        match PREV_UTILITY {
            Some(prev) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                prev(pstmt, query, context, params, env, dest, qc)
            }),
            None => pg_sys::standard_ProcessUtility(pstmt, query, context, params, env, dest, qc),
        }
    }
}
