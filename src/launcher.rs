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
    loop {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let wanted = crate::gucs::databases();
        let per_db = crate::gucs::workers();
        let existing = list_databases();
        let now = Instant::now();

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
            if !allow || held(*oid) {
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
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

/// (name, oid, datallowconn) of every database, read from the shared catalog directly: the
/// launcher has no database of its own to parse SQL in.
fn list_databases() -> Vec<(String, pg_sys::Oid, bool)> {
    let mut out = Vec::new();
    unsafe {
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
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
    }
    out
}

/// Whether a DROP DATABASE asked the launcher to leave this database alone for now.
fn held(db: pg_sys::Oid) -> bool {
    let Some(s) = shmem::shared() else {
        return false;
    };
    s.db_hold_oid.load(Ordering::Acquire) == db.to_u32()
        && s.db_hold_until_ms.load(Ordering::Acquire) > shmem::now_ms()
}
