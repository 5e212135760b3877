//! The trust boundary: how fhir_sync runs code that belongs to someone else, and how its own
//! statements stay independent of what a user controls.
//!
//! Three rules, each applied in one place here:
//! - **Owners' code runs as its owner, sandboxed** ([`as_owner`]): reading a tracked table's rows
//!   runs the casts and output functions of its column types, and a mapping function is its
//!   owner's code. They run as the table's owner in a security-restricted operation (no SET ROLE,
//!   no temporary objects), under a GUC nest level of their own, in a subtransaction that is
//!   always rolled back: no setting, lock, write or role change they make outlives the call —
//!   what PostgreSQL does for index builds and REFRESH MATERIALIZED VIEW.
//! - **fhir_sync's own statements resolve nothing through a user's schema**: every worker
//!   transaction starts from `search_path = pg_catalog, pg_temp` ([`worker_transaction_start`]),
//!   SQL functions written in Rust run under the same path ([`pinned`]), and the plpgsql ones
//!   carry it as a SET clause. Functions and operators are never looked up in pg_temp, so with
//!   that path every unqualified operator, function, cast and type is pg_catalog's.
//! - **Nothing waits forever**: in the worker, every transaction runs under
//!   `fhir_sync.lock_timeout` and `fhir_sync.statement_timeout`, and each call of owners' code gets a
//!   statement timeout of its own; session-level advisory locks are released after every
//!   transaction (the worker holds none of its own; owners' code could take one).

use crate::error::PgError;
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

/// The search_path every statement of fhir_sync runs under.
pub const PINNED_SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

thread_local! {
    /// Set once in a delivery worker process: timeouts are the worker's to arm; in a user's
    /// session the user's own statement_timeout governs.
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
    /// How many `as_owner` calls are running (owners' code may call fhir_sync's SQL functions,
    /// which read through `as_owner` again): a nested call is the owner's, not the worker's.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Milliseconds on a monotonic clock, from the first call in this process (a wall-clock jump
/// must not fire the watchdog); never 0, which means "disarmed".
fn mono_ms() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as i64
        + 1
}

/// Marks this process as a delivery worker, and starts the watchdog. Once per process, from
/// the worker's main thread (each call registers an exit callback and starts a thread).
pub fn enter_worker() {
    IN_WORKER.with(|w| w.set(true));
    mono_ms();
    // SAFETY: registered once per worker process (one of on_proc_exit's 20 slots), on its main
    // thread; the callback is a static fn that only logs at LOG level.
    unsafe { pg_sys::on_proc_exit(Some(explain_exit), pg_sys::Datum::from(0)) };
    crate::threads::block_signals_around(|| {
        std::thread::spawn(watchdog);
    });
}

/// When the owners' code running now must have ended (mono_ms, statement timeout plus
/// OVERRUN); 0 while none runs.
static OWNER_DEADLINE: AtomicI64 = AtomicI64::new(0);
/// The role whose code the watchdog stopped (0: none).
static OVERRAN: AtomicU32 = AtomicU32::new(0);
/// How long owners' code may go on after its statement timeout fired. Code that catches the
/// cancel (plpgsql's `EXCEPTION WHEN query_canceled`) and goes on would otherwise hold the
/// worker for ever.
const OVERRUN_MS: i64 = 2_000;

/// The watchdog: owners' code still running OVERRUN after its statement timeout gets what
/// pg_terminate_backend would send — an interrupt no code can catch. The worker exits (FATAL)
/// and the launcher starts another; the log says whose code it was.
fn watchdog() {
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let deadline = OWNER_DEADLINE.load(Ordering::Acquire);
        if deadline != 0
            && mono_ms() > deadline
            && OWNER_DEADLINE
                .compare_exchange(deadline, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // SAFETY: what die() would set, written atomically (sequentially consistent, the die
            // flag before the interrupt flag) because the main thread reads and clears them at
            // the same time: PostgreSQL declares them volatile sig_atomic_t, aligned ints that
            // AtomicI32 may view. kill() calls no PostgreSQL code; the SIGUSR1 handler runs on the
            // main thread (this one blocks every signal) and sets the latch, ending a wait.
            unsafe {
                let die = std::sync::atomic::AtomicI32::from_ptr(&raw mut pg_sys::ProcDiePending);
                let pending =
                    std::sync::atomic::AtomicI32::from_ptr(&raw mut pg_sys::InterruptPending);
                die.store(1, Ordering::SeqCst);
                pending.store(1, Ordering::SeqCst);
                libc::kill(libc::getpid(), libc::SIGUSR1);
            }
        }
    }
}

/// on_proc_exit: when the watchdog ended the worker, say why (the FATAL line before it is
/// PostgreSQL's generic "terminating background worker … due to administrator command").
///
/// Not #[pg_guard]ed: it must not panic or raise (it runs inside proc_exit); LOG does neither.
// SAFETY: called only by proc_exit on the main thread, arguments by value; it reads an atomic.
unsafe extern "C-unwind" fn explain_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    let role = OVERRAN.load(Ordering::Acquire);
    if role != 0 {
        pgrx::log!(
            "fhir_sync worker: stopped: code run as role {role} (a tracked table's owner) went on past fhir_sync.statement_timeout, catching the cancel; a new worker starts"
        );
    }
}

pub fn in_worker() -> bool {
    IN_WORKER.with(|w| w.get())
}

// timeout.h is not in pgrx's bindings. TimeoutId is a C enum; STATEMENT_TIMEOUT is its fourth
// member on every supported major (STARTUP_PACKET, DEADLOCK, LOCK, STATEMENT, …).
extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
}
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;

/// Inside `as_owner` only: fhir_sync's own statements that run there next, the row fetches of
/// `relid` kept by plans.rs, use their generic plan. A kept fetch of `key = ANY ($1)` was otherwise
/// planned anew at every execution, since a custom plan for a few keys always looks cheaper than
/// the generic one priced for ten: 3 % of the worker's CPU at 2,000 new rows a second (perf,
/// session 14). Not for a partitioned table: there the array is a parameter in a generic plan,
/// which prunes no partition, and every fetch would probe every partition. (Owners' code that
/// runs inside the fetch, a cast or an output function, plans its own statements the same way;
/// the setting ends with the sandbox's GUC level.)
pub fn generic_plans_for(relid: pg_sys::Oid) {
    // SAFETY: a syscache lookup in the caller's transaction; an unknown relation gives '\0'.
    let relkind = unsafe { pg_sys::get_rel_relkind(relid) } as u8;
    if relkind != pg_sys::RELKIND_PARTITIONED_TABLE {
        set_guc(c"plan_cache_mode", c"force_generic_plan", true);
    }
}

/// Sets a GUC the way SET (or, with `save`, a function's SET clause) does.
fn set_guc(name: &CStr, value: &CStr, save: bool) {
    let action = if save {
        pg_sys::GucAction::GUC_ACTION_SAVE
    } else {
        pg_sys::GucAction::GUC_ACTION_SET
    };
    // SAFETY: name and value are NUL-terminated and outlive the call; set_config_option copies
    // what it keeps and raises an ERROR (a Rust panic through pgrx's guard) on a bad value.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            pgrx::PgLogLevel::ERROR as i32,
            false,
        );
    }
}

fn search_path_is_pinned() -> bool {
    // SAFETY: namespace_search_path is the GUC's current value, a NUL-terminated string owned
    // by guc.c (never null once GUCs are initialised); read only.
    unsafe {
        let p = pg_sys::namespace_search_path;
        !p.is_null() && CStr::from_ptr(p) == PINNED_SEARCH_PATH
    }
}

/// Arms the worker's statement timeout (fhir_sync.statement_timeout) from now; 0 disarms it.
fn arm_statement_timeout() {
    let ms = crate::gucs::statement_timeout_ms();
    // SAFETY: STATEMENT_TIMEOUT is registered by InitPostgres in every backend with a database
    // connection (workers included); its handler SIGINTs this process, whose handler only sets
    // flags: the ERROR comes at the next interrupt check. Called unguarded, on the main thread:
    // both raise nothing below FATAL (a bad index, a failed setitimer), which exits, no longjmp.
    unsafe {
        if ms > 0 {
            enable_timeout_after(STATEMENT_TIMEOUT, ms);
        } else {
            disable_timeout(STATEMENT_TIMEOUT, false);
        }
    }
}

/// Start of every worker transaction: the session settings the worker's statements rely on.
pub fn worker_transaction_start() {
    if !in_worker() {
        return;
    }
    if !search_path_is_pinned() {
        set_guc(c"search_path", PINNED_SEARCH_PATH, false);
    }
    let lock = CString::new(format!("{}ms", crate::gucs::lock_timeout_ms())).expect("no NUL");
    set_guc(c"lock_timeout", &lock, false);
    arm_statement_timeout();
}

/// End of every worker transaction (committed or not).
pub fn worker_transaction_end() {
    if !in_worker() {
        return;
    }
    // SAFETY: main thread; disarming a timeout that is not armed is a no-op (and raises at most
    // FATAL); QueryCancelPending's only other writer is a signal handler on this thread.
    // USER_LOCKMETHOD (advisory locks) is the only lock method with session locks the worker
    // could hold, and it takes none itself: what is there was left by owners' code.
    unsafe {
        disable_timeout(STATEMENT_TIMEOUT, false);
        // A timeout that fired after the transaction's last interrupt check must not cancel the
        // next transaction (or raise outside one, in the main loop).
        pg_sys::QueryCancelPending = 0;
        pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as _);
    }
}

/// Runs `f` (fhir_sync's own statements, in a user's session) with the search_path pinned;
/// the caller's path is back when it returns (or when its transaction aborts).
pub fn pinned<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the nest level opened here is closed below on the normal path; on an ERROR the
    // (sub)transaction abort closes every level above its own, as for a function's SET clause.
    let nest = unsafe { pg_sys::NewGUCNestLevel() };
    set_guc(c"search_path", PINNED_SEARCH_PATH, true);
    let r = f();
    // SAFETY: `nest` is the level opened above and still the innermost: inner levels (the
    // sandbox's, subtransactions') are closed before their code returns. Restores the SAVEd path.
    unsafe { pg_sys::AtEOXact_GUC(true, nest) };
    r
}

/// Who runs code owned by `owner` (a tracked table's owner) here. In a worker: the owner. In a
/// user's session: the owner when the caller already has the owner's privileges (a superuser
/// drops to the owner's rights), else the caller itself — its own rights, so it gains nothing,
/// and row-level security applies to what it reads. Never the owner for a caller without the
/// owner's privileges: that would let it read, or run code, with rights it does not have.
pub fn runner_for(owner: pg_sys::Oid) -> pg_sys::Oid {
    // Inside owners' code (DEPTH > 0) the caller is that owner, in the worker as anywhere: it
    // gets the user-session rule, never another owner's rights.
    if owner == pg_sys::InvalidOid || (in_worker() && DEPTH.with(|d| d.get()) == 0) {
        return owner;
    }
    // SAFETY: GetUserId reads backend state; has_privs_of_role reads pg_authid through the
    // syscache, which needs the transaction every caller runs in (unchecked).
    unsafe {
        let user = pg_sys::GetUserId();
        if pg_sys::has_privs_of_role(user, owner) {
            owner
        } else {
            user
        }
    }
}

/// Runs `f` — anything that may execute code owned by someone else — as `owner`, sandboxed (see the
/// module's comment). What `f` returns must live in Rust memory: the subtransaction it ran in
/// is rolled back. A PostgreSQL error inside comes back as `Err`, with its SQLSTATE.
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> Result<R, PgError> {
    // The worker's own call (not one made by owners' code through fhir_sync's SQL functions)
    // arms the timeout and the watchdog; a nested call never extends them.
    let outer = in_worker() && DEPTH.with(|d| d.get()) == 0;
    DEPTH.with(|d| d.set(d.get() + 1));
    let r = crate::subxact::rolled_back(|| {
        let (mut user, mut sec) = (pg_sys::InvalidOid, 0i32);
        // SAFETY: Get/SetUserIdAndSecContext only read and write backend-local state; the
        // previous identity is restored below, and by the subtransaction's abort on ERROR.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
            pg_sys::SetUserIdAndSecContext(
                if owner == pg_sys::InvalidOid {
                    user
                } else {
                    owner
                },
                sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                    | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
        }
        // SAFETY: closed below with isCommit = false, which undoes every setting made inside,
        // session-level ones included; the subtransaction's abort does the same on ERROR.
        let nest = unsafe { pg_sys::NewGUCNestLevel() };
        set_guc(c"search_path", PINNED_SEARCH_PATH, true);
        if outer {
            arm_statement_timeout();
            let ms = crate::gucs::statement_timeout_ms() as i64;
            if ms > 0 {
                OVERRAN.store(owner.to_u32(), Ordering::Release);
                OWNER_DEADLINE.store(mono_ms() + ms + OVERRUN_MS, Ordering::Release);
            }
        }
        let out = f();
        // SAFETY: `nest` is the level opened above, still innermost (f's own levels and
        // subtransactions are closed when it returns); user and sec are those saved above.
        unsafe {
            pg_sys::AtEOXact_GUC(false, nest);
            pg_sys::SetUserIdAndSecContext(user, sec);
        }
        out
    });
    DEPTH.with(|d| d.set(d.get() - 1));
    if outer {
        // Ended, normally or by an ERROR: the watchdog stands down.
        OWNER_DEADLINE.store(0, Ordering::Release);
        OVERRAN.store(0, Ordering::Release);
        // The worker's own statements that follow get a fresh budget.
        arm_statement_timeout();
    }
    r
}
