//! Running code so that a PostgreSQL ERROR inside it is caught, not fatal: whole worker
//! transactions, and subtransactions around code that may fail on its own (a row that cannot be
//! read, a user's mapping function).
//!
//! pgrx's `BackgroundWorker::transaction` re-raises errors, which would end the worker
//! process; a worker must instead settle the offending change and carry on. A caught error
//! keeps its SQLSTATE, detail and hint ([`PgError`]).

use crate::error::{FhirSyncError, PgError};
use pgrx::pg_sys;
use pgrx::PgTryBuilder;
use std::panic::AssertUnwindSafe;

/// Runs `f` in its own transaction and commits it. An ERROR (or a panic) rolls the transaction
/// back and comes back as `Err`.
///
/// Every worker transaction starts from the worker's own session settings (`sandbox::worker`):
/// a pinned search_path, lock_timeout and a statement timeout, whatever ran before it.
///
/// Only from a worker's main thread, outside any transaction (unchecked: inside one it would
/// raise an ERROR or end the caller's transaction). An ERROR raised by the commit itself (a
/// deferred constraint, a serialization failure) is not caught: it escapes as a panic.
pub fn transaction<R>(f: impl FnOnce() -> R) -> Result<R, PgError> {
    // SAFETY: the worker's main thread between transactions (see above; every caller is the
    // worker loop); StartTransactionCommand/PushActiveSnapshot are paired with the end below.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let mut f = Some(f);
    let result = PgTryBuilder::new(AssertUnwindSafe(|| {
        crate::sandbox::worker_transaction_start();
        Ok((f.take().expect("runs once"))())
    }))
    .catch_others(|e| Err(PgError::from_caught(e)))
    .execute();
    crate::sandbox::worker_transaction_end();
    // SAFETY: the transaction started above is still current: an ERROR inside was caught by
    // pgrx's guard, which flushed the error state and left the transaction for us to abort.
    unsafe {
        match result {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => {
                // AbortCurrentTransaction also releases the snapshot and any SPI connection.
                pg_sys::AbortCurrentTransaction();
            }
        }
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
        // A background worker reports its table statistics only when asked. Without this the
        // outbox and the sync state never look changed to autovacuum: never analysed, never
        // vacuumed, and every lookup degrades into a scan. (Rate-limited inside PostgreSQL.)
        pg_sys::pgstat_report_stat(false);
    }
    result
}

/// `transaction` for work that has errors of its own: both kinds come back as one.
pub fn transaction_flat<R>(
    f: impl FnOnce() -> Result<R, FhirSyncError>,
) -> Result<R, FhirSyncError> {
    transaction(f).map_err(FhirSyncError::from).and_then(|r| r)
}

/// Runs `f` in a subtransaction that is always rolled back: what it wrote, the locks it took and
/// the settings it changed are undone. Only inside a transaction, on the main thread
/// (unchecked; every caller runs in a worker transaction or an SQL function).
pub fn rolled_back<R>(f: impl FnOnce() -> R) -> Result<R, PgError> {
    in_subtransaction(f, true)
}

fn in_subtransaction<R>(f: impl FnOnce() -> R, always_roll_back: bool) -> Result<R, PgError> {
    // SAFETY: a transaction is in progress (every caller runs inside one); the subtransaction
    // begun here is released or rolled back before returning, and the memory context and
    // resource owner current on entry are restored, as PL/pgSQL does around an EXCEPTION block.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let mut f = Some(f);
        let result = PgTryBuilder::new(AssertUnwindSafe(|| Ok((f.take().expect("runs once"))())))
            .catch_others(|e| Err(PgError::from_caught(e)))
            .execute();
        match result {
            Ok(_) if !always_roll_back => pg_sys::ReleaseCurrentSubTransaction(),
            _ => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}
