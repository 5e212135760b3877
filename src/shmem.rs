//! State the workers share with every backend: where to find each worker's latch (so a commit
//! can wake it), the leases of what each has claimed, and the counters and latency histogram
//! behind the metrics views.
//!
//! Everything is an atomic in one fixed struct, so readers never take a lock and the commit
//! callback, which must not fail, does nothing that can.

use pgrx::pg_sys;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

pub const MAX_WORKERS: usize = 32;

/// Upper bounds (seconds) of the call-latency histogram, Prometheus style; +Inf is implicit.
pub const LATENCY_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
pub const N_BUCKETS: usize = LATENCY_BOUNDS.len() + 1;
pub const N_CLASSES: usize = 16;

#[repr(C)]
pub struct WorkerSlot {
    pub pid: AtomicI32,
    pub db_oid: AtomicU32,
    latch: AtomicUsize,
    pub state: AtomicU32,
    pub batch: AtomicU64,
    pub last_success_ms: AtomicI64,
    pub last_error_class: AtomicU32,
    pub last_error_ms: AtomicI64,
    pub started_ms: AtomicI64,
    /// Passes of the worker's loop since it started (tests wait on it instead of sleeping).
    pub cycles: AtomicU64,
    /// Set by DROP DATABASE (and RENAME): the worker must disconnect now.
    pub leave: std::sync::atomic::AtomicBool,
}

#[repr(C)]
pub struct Shared {
    pub workers: [WorkerSlot; MAX_WORKERS],
    /// Outbox rows settled as delivered.
    pub processed_total: AtomicU64,
    /// Failed deliveries (per resource attempt), transient or permanent.
    pub failed_total: AtomicU64,
    pub dead_lettered_total: AtomicU64,
    pub calls_total: AtomicU64,
    pub call_errors: [AtomicU64; N_CLASSES],
    pub latency_buckets: [AtomicU64; N_BUCKETS],
    pub latency_sum_us: AtomicU64,
    pub paused_reason: AtomicU32,
    pub paused_until_ms: AtomicI64,
    pub stats_reset_ms: AtomicI64,
    /// A database being dropped: the launcher starts no worker there until the hold expires.
    pub db_hold_oid: AtomicU32,
    pub db_hold_until_ms: AtomicI64,
    /// fhir_sync.max_requests_per_second: when the next request to the server may start
    /// (µs on CLOCK_MONOTONIC), shared by every worker (`fhir_sync_core::rate`).
    pub next_request_us: AtomicU64,
    /// What the server's CapabilityStatement said and what the workers made of it (JSON, for
    /// the fhir_sync_server view): written by a worker when it reads the statement.
    pub server: TextSlot,
    /// Each worker's leases, beside its slot in `workers` (worker/lease.rs).
    pub leases: [LeaseSlot; MAX_WORKERS],
}

/// The resources one worker has claimed and not settled (`fhir_sync_core::lease`). Written by
/// that worker only while it holds its database's claim lock (and freed by it at any time); read
/// by the other workers of the database under the claim lock.
#[repr(C)]
pub struct LeaseSlot {
    /// The leases are void after this (ms since the epoch): a live worker that stopped claiming
    /// for fhir_sync.lease_time is taken to be stuck.
    pub until_ms: AtomicI64,
    /// Outbox rows under these leases.
    pub ids: AtomicU64,
    /// Entries in use are below this.
    pub high: AtomicUsize,
    pub keys: [AtomicU64; fhir_sync_core::lease::PER_WORKER],
}

/// Words of the TextSlot (8 KiB of text).
const TEXT_WORDS: usize = 1024;

/// A short text many processes read and one writes now and then, behind a sequence counter
/// (odd while a write is under way): readers retry instead of locking.
#[repr(C)]
pub struct TextSlot {
    seq: AtomicU64,
    len: AtomicU64,
    words: [AtomicU64; TEXT_WORDS],
}

impl TextSlot {
    /// Stores `text` (cut to 8 KiB at a character boundary). Concurrent writers (two workers
    /// publishing at once) take turns on the odd counter.
    pub fn write(&self, text: &str) {
        let mut end = text.len().min(TEXT_WORDS * 8);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let bytes = &text.as_bytes()[..end];
        loop {
            let s = self.seq.load(Ordering::Acquire);
            if s.is_multiple_of(2)
                && self
                    .seq
                    .compare_exchange(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                break;
            }
            std::hint::spin_loop();
        }
        // The words below must not be seen before the odd counter (as in crossbeam's SeqLock).
        std::sync::atomic::fence(Ordering::Release);
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.words[i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        self.len.store(bytes.len() as u64, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// The text, or None when nothing was written yet.
    pub fn read(&self) -> Option<String> {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if !before.is_multiple_of(2) {
                std::hint::spin_loop();
                continue;
            }
            let len = (self.len.load(Ordering::Relaxed) as usize).min(TEXT_WORDS * 8);
            let mut bytes = Vec::with_capacity(len);
            for w in &self.words[..len.div_ceil(8)] {
                bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            bytes.truncate(len);
            std::sync::atomic::fence(Ordering::Acquire);
            if self.seq.load(Ordering::Acquire) == before {
                return (before > 0).then(|| String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
}

static mut SHARED: *mut Shared = std::ptr::null_mut();
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;

/// Only from _PG_init while shared_preload_libraries is being processed (lib.rs checks).
pub fn init() {
    // SAFETY: _PG_init in the postmaster, single-threaded, before shared memory exists: the hook
    // chain is written once here and inherited by every child; on 13/14 the request is legal now.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>());
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        {
            PREV_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(request);
        }
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup);
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pgrx::pg_guard]
// SAFETY: PostgreSQL calls it only as the shmem_request_hook, once, in the postmaster.
unsafe extern "C-unwind" fn request() {
    // SAFETY: PREV_REQUEST was set in init() before this hook could run; requesting space is
    // what this hook exists for.
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>());
    }
}

#[pgrx::pg_guard]
// SAFETY: PostgreSQL calls it only as the shmem_startup_hook, after the space was requested,
// in the postmaster (and, under EXEC_BACKEND, in each child before it runs anything else).
unsafe extern "C-unwind" fn startup() {
    // SAFETY: MainLWLockArray[21] is AddinShmemInitLock on every supported major; under it the
    // struct is found or created and zeroed exactly once. SHARED is written before any thread.
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        // AddinShmemInitLock is a C macro over this slot of the main LWLock array.
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let ptr = pg_sys::ShmemInitStruct(
            c"fhir_sync".as_ptr(),
            std::mem::size_of::<Shared>(),
            &mut found,
        )
        .cast::<Shared>();
        if !found {
            // All-zero is a valid value for every field: idle slots, zero counters.
            std::ptr::write_bytes(ptr, 0, 1);
            (*ptr).stats_reset_ms.store(now_ms(), Ordering::Relaxed);
        }
        SHARED = ptr;
        pg_sys::LWLockRelease(lock);
    }
}

/// The shared state, or None in a process that did not preload the library.
pub fn shared() -> Option<&'static Shared> {
    // SAFETY: SHARED is written only by startup(), before any backend or thread exists, so this
    // read (from any thread) races with nothing; the segment lives as long as the process, and
    // every field is an atomic, so a shared reference to memory other processes write is sound.
    unsafe { (&raw const SHARED).read().as_ref() }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Wakes the workers serving `db`. Called from the commit callback: touches only atomics and
/// latches, which cannot fail. Main thread only: pgrx's guard on SetLatch panics elsewhere, and
/// a panic in the (unguarded) commit callback would unwind into xact.c.
pub fn wake_database(db: pg_sys::Oid) {
    let Some(shared) = shared() else { return };
    for slot in &shared.workers {
        // A worker with no server to send to, or paused, sends nothing whatever it is told;
        // waking it would cost every committing writer a signal and the worker a loop for
        // nothing. It looks at the queue again when its settings change (SIGHUP sets its
        // latch) or its pause ends.
        let deaf = [
            WorkerState::NotConfigured,
            WorkerState::Misconfigured,
            WorkerState::Paused,
        ]
        .map(|s| s as u32)
        .contains(&slot.state.load(Ordering::Relaxed));
        if !deaf
            && slot.pid.load(Ordering::Acquire) != 0
            && slot.db_oid.load(Ordering::Acquire) == db.to_u32()
        {
            let latch = slot.latch.load(Ordering::Acquire);
            if latch != 0 {
                // SAFETY: a worker's MyLatch is its PGPROC's procLatch, in shared memory at the
                // same address in every process and never freed: if the worker has gone (or the
                // PGPROC is reused), SetLatch only wakes nobody or someone spuriously.
                unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
            }
        }
    }
}

/// The worker states shown in fhir_sync_workers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum WorkerState {
    Stopped = 0,
    Starting = 1,
    Idle = 2,
    Working = 3,
    Paused = 4,
    NoExtension = 5,
    NotConfigured = 6,
    /// A server is set, but its settings were refused (an unreadable secret file, credentials
    /// over plain http): the log says why.
    Misconfigured = 7,
    /// The extension's SQL is of another version than the library (a package installed, and
    /// ALTER EXTENSION … UPDATE not run yet): changes are captured and wait.
    NeedsUpdate = 8,
}

impl WorkerState {
    pub fn name(v: u32) -> &'static str {
        match v {
            1 => "starting",
            2 => "idle",
            3 => "working",
            4 => "paused",
            5 => "waiting for CREATE EXTENSION",
            6 => "waiting for fhir_sync.server_url",
            7 => "sending nothing: settings refused (see the log)",
            8 => "waiting for ALTER EXTENSION fhir_sync UPDATE",
            _ => "stopped",
        }
    }
}

impl WorkerSlot {
    /// Only from a worker's main thread once it has a PGPROC (as every shmem-attached
    /// background worker has when its main function runs): other processes set its latch.
    pub fn claim(&self, db: pg_sys::Oid) {
        self.db_oid.store(db.to_u32(), Ordering::Release);
        // SAFETY: a plain read of a backend global on its main thread; with a PGPROC, MyLatch is
        // its shared procLatch (before InitProcess it would be a process-local latch: unchecked).
        self.latch
            .store(unsafe { pg_sys::MyLatch } as usize, Ordering::Release);
        self.started_ms.store(now_ms(), Ordering::Relaxed);
        self.batch.store(0, Ordering::Relaxed);
        self.cycles.store(0, Ordering::Relaxed);
        self.leave.store(false, Ordering::Relaxed);
        self.state
            .store(WorkerState::Starting as u32, Ordering::Relaxed);
        // SAFETY: MyProcPid is set once at process start and never written again.
        self.pid
            .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
    }
    pub fn release(&self) {
        self.pid.store(0, Ordering::Release);
        self.latch.store(0, Ordering::Release);
        self.state
            .store(WorkerState::Stopped as u32, Ordering::Relaxed);
    }
    pub fn set_state(&self, s: WorkerState) {
        self.state.store(s as u32, Ordering::Relaxed);
    }
}

impl Shared {
    pub fn record_call(&self, seconds: f64) {
        self.calls_total.fetch_add(1, Ordering::Relaxed);
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
    pub fn record_call_error(&self, class: usize) {
        self.call_errors[class.min(N_CLASSES - 1)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn reset(&self) {
        for c in [
            &self.processed_total,
            &self.failed_total,
            &self.dead_lettered_total,
            &self.calls_total,
            &self.latency_sum_us,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.call_errors
            .iter()
            .chain(self.latency_buckets.iter())
            .for_each(|c| c.store(0, Ordering::Relaxed));
        self.stats_reset_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// Counts one answered call in the shared metrics; safe from the sending threads (atomics only).
pub fn record_call(seconds: f64) {
    if let Some(s) = shared() {
        s.record_call(seconds);
    }
}
