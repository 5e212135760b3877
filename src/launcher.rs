//! The launcher: one static background worker that starts a delivery worker per database and
//! slot, and restarts them when they stop.
//!
//! Static per-database workers would crash-loop against a database that does not exist (or was
//! just dropped). The launcher connects to no database, reads pg_database (a shared catalog)
//! and starts a worker only where there is something to serve. It also makes
//! fhir_sync.database and fhir_sync.workers reloadable.
//!
//! DROP DATABASE must not wait for our worker: a ProcessUtility hook (utility.rs) asks the
//! database's workers to leave and holds the launcher off that database for a while.

use crate::shmem::{self, MAX_WORKERS};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub fn register() {
    BackgroundWorkerBuilder::new("fhir_sync launcher")
        .set_type("fhir_sync launcher")
        .set_library("fhir_sync")
        .set_function("fhir_sync_launcher_main")
        .enable_spi_access()
        // A hot standby cannot write the outbox: nothing starts until it is promoted.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
    crate::utility::install();
}

struct Running {
    handle: DynamicBackgroundWorker,
    slot: usize,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn fhir_sync_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    pgrx::log!("fhir_sync launcher started");
    let mut running: HashMap<(String, usize), Running> = HashMap::new();
    let mut next_try: HashMap<(String, usize), Instant> = HashMap::new();
    let mut missing_logged: Vec<String> = Vec::new();
    // The worker role as last checked: (fhir_sync.username, what was found, logged).
    let mut role_seen: Option<(Option<String>, RoleStatus)> = None;
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the launcher's main loop, outside any transaction, as PostgreSQL's own
            // auxiliary processes re-read the configuration.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let wanted = crate::gucs::databases();
        let per_db = crate::gucs::workers();
        let username = crate::gucs::username();
        let (existing, role) = read_catalog(username.as_deref());
        let now = Instant::now();
        if role_seen.as_ref() != Some(&(username.clone(), role)) {
            if role_seen.as_ref().is_some_and(|(u, _)| *u != username) {
                // Workers connect once: a new role means new workers.
                for (_, r) in running.drain() {
                    let _ = r.handle.terminate();
                }
            }
            role.log(username.as_deref());
            role_seen = Some((username.clone(), role));
        }
        let role_usable = role.usable();

        // Forget workers that stopped (crash, pg_terminate_backend, DROP DATABASE).
        running.retain(|key, r| match r.handle.pid() {
            Ok(_) => true,
            Err(pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted) => true,
            Err(_) => {
                if let Some(s) = shmem::shared() {
                    s.workers[r.slot].release();
                }
                next_try.insert(key.clone(), now + Duration::from_secs(1));
                false
            }
        });
        // Stop workers nobody wants any more.
        let unwanted: Vec<_> = running
            .keys()
            .filter(|(db, i)| {
                !wanted.contains(db) || *i >= per_db || !existing.iter().any(|(n, _, _)| n == db)
            })
            .cloned()
            .collect();
        for key in unwanted {
            if let Some(r) = running.remove(&key) {
                let _ = r.handle.terminate();
            }
        }
        for db in &wanted {
            let Some((_, oid, allow)) = existing.iter().find(|(n, _, _)| n == db) else {
                if !missing_logged.contains(db) {
                    pgrx::log!("fhir_sync launcher: database \"{db}\" does not exist; nothing to deliver there");
                    missing_logged.push(db.clone());
                }
                continue;
            };
            missing_logged.retain(|m| m != db);
            if !allow || held(*oid) || !role_usable {
                continue;
            }
            for i in 0..per_db {
                let key = (db.clone(), i);
                if running.contains_key(&key) || next_try.get(&key).is_some_and(|t| *t > now) {
                    continue;
                }
                let Some(slot) = free_slot(&running) else {
                    break;
                };
                match start_worker(db, i, slot) {
                    Some(handle) => {
                        running.insert(key, Running { handle, slot });
                    }
                    None => {
                        pgrx::warning!("fhir_sync launcher: could not start a worker for \"{db}\" (max_worker_processes?)");
                        next_try.insert(key, now + Duration::from_secs(10));
                    }
                }
            }
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_millis(500))) {
            break;
        }
    }
    for (_, r) in running {
        let _ = r.handle.terminate();
    }
    // SAFETY: the main thread, outside any transaction; proc_exit never returns, and what is
    // left on this frame is plain Rust memory the exit reclaims (the handles were used up).
    unsafe { pg_sys::proc_exit(1) };
}

fn free_slot(running: &HashMap<(String, usize), Running>) -> Option<usize> {
    let shared = shmem::shared()?;
    (0..MAX_WORKERS).find(|s| {
        !running.values().any(|r| r.slot == *s)
            && shared.workers[*s].pid.load(Ordering::Acquire) == 0
    })
}

fn start_worker(db: &str, i: usize, slot: usize) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("fhir_sync worker {i} for database {db}"))
        .set_type("fhir_sync worker")
        .set_library("fhir_sync")
        .set_function("fhir_sync_worker_main")
        .set_argument((slot as i32).into_datum())
        .set_extra(db)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        // SAFETY: MyProcPid is set once at process start and never written again.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

/// What the role named by fhir_sync.username (or, empty, the bootstrap superuser) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RoleStatus {
    BootstrapSuperuser,
    Superuser,
    Ordinary,
    Missing,
    NoLogin,
}

impl RoleStatus {
    fn usable(self) -> bool {
        !matches!(self, RoleStatus::Missing | RoleStatus::NoLogin)
    }

    /// Said once each time the setting or the role changes.
    fn log(self, name: Option<&str>) {
        let name = name.unwrap_or("");
        match self {
            RoleStatus::BootstrapSuperuser => pgrx::warning!(
                "fhir_sync launcher: the workers connect as the bootstrap superuser; set fhir_sync.username to a dedicated role (SELECT fhir_sync_grant_worker('role') gives it what it needs)"
            ),
            RoleStatus::Superuser => pgrx::warning!(
                "fhir_sync launcher: the workers connect as \"{name}\", a superuser; a non-superuser role with the grants of fhir_sync_grant_worker() is all they need"
            ),
            RoleStatus::Ordinary => {
                pgrx::log!("fhir_sync launcher: the workers connect as role \"{name}\"")
            }
            RoleStatus::Missing => pgrx::warning!(
                "fhir_sync launcher: role \"{name}\" named by fhir_sync.username does not exist; no worker starts until it does"
            ),
            RoleStatus::NoLogin => pgrx::warning!(
                "fhir_sync launcher: role \"{name}\" named by fhir_sync.username cannot log in; no worker starts until it has LOGIN"
            ),
        }
    }
}

/// (name, oid, datallowconn) of every database, and what the worker role is, read from the
/// shared catalogs directly: the launcher has no database of its own to parse SQL in.
fn read_catalog(role: Option<&str>) -> (Vec<(String, pg_sys::Oid, bool)>, RoleStatus) {
    let mut out = Vec::new();
    // SAFETY: the launcher's main loop, outside any transaction: the transaction begun here
    // is committed below; pg_database and pg_authid are shared catalogs, readable with no
    // database connected; heap_getnext's tuple is read before the next call, the scan ended and
    // the syscache tuple released before commit, and only fixed-size fields are read.
    unsafe {
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let status = match role {
            None => RoleStatus::BootstrapSuperuser,
            Some(name) => {
                let c = std::ffi::CString::new(name).unwrap_or_default();
                crate::catalog::row(
                    pg_sys::SysCacheIdentifier::AUTHNAME,
                    pg_sys::Datum::from(c.as_ptr()),
                    |r: &pg_sys::FormData_pg_authid| {
                        if !r.rolcanlogin {
                            RoleStatus::NoLogin
                        } else if r.rolsuper {
                            RoleStatus::Superuser
                        } else {
                            RoleStatus::Ordinary
                        }
                    },
                )
                .unwrap_or(RoleStatus::Missing)
            }
        };
        let rel = pg_sys::table_open(
            pg_sys::DatabaseRelationId,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let header = (*tuple).t_data;
            let form = (header as *mut u8).add((*header).t_hoff as usize)
                as *const pg_sys::FormData_pg_database;
            let name = CStr::from_ptr((*form).datname.data.as_ptr())
                .to_string_lossy()
                .into_owned();
            out.push((name, (*form).oid, (*form).datallowconn));
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
        (out, status)
    }
}

/// Whether a DROP DATABASE asked the launcher to leave this database alone for now.
fn held(db: pg_sys::Oid) -> bool {
    let Some(s) = shmem::shared() else {
        return false;
    };
    s.db_hold_oid.load(Ordering::Acquire) == db.to_u32()
        && s.db_hold_until_ms.load(Ordering::Acquire) > shmem::now_ms()
}
