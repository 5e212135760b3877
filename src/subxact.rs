//! Running code so that a PostgreSQL ERROR inside it is caught, not fatal: whole worker
//! transactions, and subtransactions around user-supplied SQL (custom mapping functions).
//!
//! pgrx's `BackgroundWorker::transaction` re-raises errors, which would end the worker
//! process; a worker must instead settle the offending change and carry on.

use pgrx::pg_sys;
use pgrx::PgTryBuilder;
use std::panic::AssertUnwindSafe;

/// Runs `f` in its own transaction and commits it. An ERROR (or a panic) rolls the transaction
/// back and comes back as `Err(message)`.
pub fn transaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let mut f = Some(f);
    let result = PgTryBuilder::new(AssertUnwindSafe(|| Ok((f.take().expect("runs once"))())))
        .catch_others(|e| Err(caught_message(e)))
        .execute();
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

/// Runs `f` in a subtransaction of the current transaction. On ERROR the subtransaction is
/// rolled back and the outer transaction goes on.
pub fn subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    in_subtransaction(f, false)
}

/// Runs `f` in a subtransaction that is always rolled back: what it wrote is undone.
pub fn rolled_back<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    in_subtransaction(f, true)
}

fn in_subtransaction<R>(f: impl FnOnce() -> R, always_roll_back: bool) -> Result<R, String> {
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let mut f = Some(f);
        let result = PgTryBuilder::new(AssertUnwindSafe(|| Ok((f.take().expect("runs once"))())))
            .catch_others(|e| Err(caught_message(e)))
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

fn caught_message(e: pg_sys::panic::CaughtError) -> String {
    use pg_sys::panic::CaughtError::*;
    match e {
        PostgresError(r) | ErrorReport(r) | RustPanic { ereport: r, .. } => r.message().to_string(),
    }
}
