//! The background worker: claim → map → send → judge → settle, woken at commit.
//!
//! Discipline (after pg_net's worker): transactions are short and never open during HTTP;
//! a PostgreSQL error in a cycle is caught, logged and the cycle abandoned (leases expire),
//! never a crash loop; the launcher starts a new worker after SIGTERM (pg_terminate_backend) or a
//! crash; SIGHUP reloads settings; a database without the extension is waited on quietly.
//!
//! This file holds the process (entry, signals, the loop) and one cycle; `pipeline` delivers a
//! claimed batch, `apply` applies the verdict fhir_sync_core's `verdict` gives on its answers,
//! `client` turns settings into an HTTP client.

mod apply;
pub mod claim;
mod client;
mod lease;
pub mod map;
mod pipeline;
mod server;
pub mod settle;

pub use fhir_sync_core::{policy, send};

use crate::error::FhirSyncError;
use crate::shmem::{self, WorkerState};
use crate::source;
use claim::Claimed;
use client::ClientSettings;
use fhir_sync_core::pause::{PauseState, Step};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pipeline::Next;
use policy::Class;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

struct Worker {
    slot: &'static shmem::WorkerSlot,
    shared: &'static shmem::Shared,
    settings: ClientSettings,
    client: Option<std::sync::Arc<crate::http::Client>>,
    pause: PauseState,
    rng: u64,
    /// Tracked tables, read at most every CATALOG_TTL (or sooner when a claim names a table
    /// not in it): catalog joins on every cycle would cost more than the delivery itself.
    tracks: Option<(Instant, String, Tracks)>,
    /// The extension's schema, re-read as often as the tracked tables.
    schema: Option<(Instant, String)>,
    /// When the catalog last said the extension is missing or of another version: it is read
    /// again only after policy::EXTENSION_RECHECK, however many commits wake the worker.
    extension_absent: Option<Instant>,
    /// Concurrency actually used, at most fhir_sync.max_in_flight: halved when the server
    /// answers 5xx or 429 (it is struggling, or serialises writes), grown by one per clean tier.
    in_flight: usize,
    /// When the next claim may start: set by a cycle that found more than one resource (changes
    /// arrive faster than cycles end), one cycle's fixed cost after it ended (pace::next_claim).
    paced: Option<Instant>,
    /// What recent single-batch cycles cost, for the pace.
    cost: fhir_sync_core::pace::CycleCost,
    /// Where the claim's scan of fresh changes starts (claim::Floor).
    floor: claim::Floor,
    /// The last failed cycle's step and error, and when it was logged.
    last_failure: Option<(&'static str, String, Instant)>,
    /// The CapabilityStatement last published (server.rs); a new client reads it again.
    published: Option<std::sync::Arc<fhir_sync_core::capability::Capabilities>>,
    /// The identities the tier in flight writes (map.rs guard_identities).
    flying: Vec<fhir_sync_core::identity::Claim>,
    /// The resources this worker has claimed and not settled, in shared memory.
    leases: lease::Leases,
}

/// Batches delivered back to back in one cycle before the worker looks at its latch, signals
/// and settings again.
const ROUNDS_PER_CYCLE: usize = 16;

type Tracks = std::rc::Rc<HashMap<pg_sys::Oid, source::Track>>;

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn fhir_sync_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: the launcher registers this worker with an int4 slot index as bgw_main_arg, a
    // by-value datum (nothing is dereferenced).
    let index =
        unsafe { i32::from_polymorphic_datum(arg, false, pg_sys::INT4OID) }.unwrap_or(0) as usize;
    let db = BackgroundWorker::get_extra().to_string();
    let Some(shared) = shmem::shared() else {
        return;
    };
    let index = index.min(shmem::MAX_WORKERS - 1);
    let slot = &shared.workers[index];
    // fhir_sync.username: the role the launcher checked (it starts no worker for a role that
    // cannot log in); empty, the bootstrap superuser.
    let role = crate::gucs::username();
    BackgroundWorker::connect_worker_to_spi(Some(&db), role.as_deref());
    // SAFETY: a read of a backend global, set by connect_worker_to_spi just above.
    slot.claim(unsafe { pg_sys::MyDatabaseId });
    pgrx::log!("fhir_sync worker started for database \"{db}\"");

    crate::sandbox::enter_worker();
    // (search_path, lock_timeout and the statement timeout are set at the start of every
    // transaction: sandbox::worker_transaction_start.)
    if let Err(e) = crate::subxact::transaction_flat(|| {
        apply_session_settings(false)?;
        Spi::run("SET application_name = 'fhir_sync worker'").map_err(Into::into)
    }) {
        pgrx::warning!(
            "fhir_sync worker: could not apply its session settings: {}",
            e.log_form()
        );
    }

    let settings = ClientSettings::read();
    let mut w = Worker {
        slot,
        shared,
        client: settings.client(),
        settings,
        pause: PauseState::default(),
        rng: seed(),
        tracks: None,
        schema: None,
        in_flight: usize::MAX,
        paced: None,
        cost: Default::default(),
        extension_absent: None,
        floor: Default::default(),
        last_failure: None,
        published: None,
        flying: Vec::new(),
        leases: lease::Leases::new(&shared.leases[index]),
    };
    loop {
        // SAFETY: a read of a sig_atomic_t PostgreSQL's signal handlers set, on the main thread.
        if BackgroundWorker::sigterm_received() || unsafe { pg_sys::ShutdownRequestPending != 0 } {
            break;
        }
        if slot.leave.load(Ordering::Acquire) {
            pgrx::log!(
                "fhir_sync worker: leaving database \"{db}\" (it is being dropped or renamed)"
            );
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: what a backend does on SIGHUP, on the main thread, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            let s = ClientSettings::read();
            if s != w.settings {
                w.client = s.client();
                w.settings = s;
            } else if let Some(c) = &w.client {
                // The same server may have changed what it can do, and the settings shown
                // with it (write modes, bundle size) may have changed: read and show it anew.
                c.relearn();
            }
            w.published = None;
            // New credentials or a new URL deserve an immediate try.
            w.pause.lift();
        }
        let nap = w.cycle();
        slot.cycles.fetch_add(1, Ordering::Relaxed);
        if let Some(nap) = nap {
            if !BackgroundWorker::wait_latch(Some(nap)) {
                break;
            }
            w.linger();
        } else {
            // SAFETY: this process's own latch, reset on its main thread.
            unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
            pgrx::check_for_interrupts!();
        }
    }
    slot.release();
    pgrx::log!("fhir_sync worker for database \"{db}\" stopping");
    // The launcher starts a new worker when this one is gone, unless the database is going.
    // SAFETY: the worker's last act, on its main thread, with no transaction open.
    unsafe { pg_sys::proc_exit(0) };
}

/// The worker's session settings. Its bookkeeping may be lost in a crash without harm (a lost
/// mark means an idempotent re-send), so it need not wait for WAL flush; and the outbox it reads
/// is hot in shared buffers, so random reads cost what sequential ones do — without that, the
/// planner trades the partial indexes for sequential scans of the whole outbox once the backlog
/// is a few percent of it. fhir_sync_explain_claim applies them too, to show the worker's plans.
/// And read committed, whatever the role or the server sets by default: the claim and the identity
/// guard read, after their locks are granted, what other workers committed meanwhile, which needs
/// a new snapshot per statement. And no JIT: the plan guards (claim::PLAN_GUARDS) price a disabled
/// node (a sort, a scan) at 10^10, far above `jit_above_cost`, and compiling a settle of 200 rows
/// took 0.7 s where running it takes 3 ms (benches/README.md, session 11).
const SESSION_SETTINGS: [(&str, &str); 4] = [
    ("synchronous_commit", "off"),
    ("random_page_cost", "1.1"),
    ("default_transaction_isolation", "read committed"),
    ("jit", "off"),
];

/// Applies SESSION_SETTINGS to the session, or (`local`) to the current transaction only.
pub fn apply_session_settings(local: bool) -> Result<(), FhirSyncError> {
    for (name, value) in SESSION_SETTINGS {
        Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.set_config($1, $2, $3)",
            &[name.into(), value.into(), local.into()],
        )?;
    }
    Ok(())
}

fn seed() -> u64 {
    // SAFETY: a read of a backend global set at process start.
    (shmem::now_ms() as u64) ^ ((unsafe { pg_sys::MyProcPid } as u64) << 32) | 1
}

impl Worker {
    /// SIGTERM (shutdown, pg_terminate_backend) or DROP DATABASE: stop starting requests.
    fn must_leave(&self) -> bool {
        // SAFETY: a read of a sig_atomic_t PostgreSQL's signal handlers set.
        let shutdown = unsafe { pg_sys::ShutdownRequestPending != 0 };
        shutdown || self.slot.leave.load(Ordering::Acquire)
    }

    /// Paused by the server, or leaving: nothing new goes out.
    fn holding_back(&self) -> bool {
        self.pause.is_paused() || self.must_leave()
    }

    /// Under load, lets the changes of the next few milliseconds join the next claim. Commits
    /// that arrive meanwhile do not cut it short (the latch is not waited on); SIGTERM and DROP
    /// DATABASE are seen when it ends, at most fhir_sync.linger later.
    fn linger(&mut self) {
        let Some(at) = self.paced.take() else {
            return;
        };
        let now = Instant::now();
        if at > now {
            // SAFETY: this process's own latch, on its main thread; WL_EXIT_ON_PM_DEATH needs no
            // cleanup here.
            unsafe {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                    (at - now).as_millis().max(1) as _,
                    pg_sys::PG_WAIT_EXTENSION,
                );
            }
        }
    }

    fn in_flight(&mut self, max: usize) -> usize {
        self.in_flight = self.in_flight.clamp(1, max.max(1));
        self.in_flight
    }

    fn jitter(&mut self) -> f64 {
        // xorshift: enough to spread retries, no crate needed.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 10_000) as f64 / 10_000.0
    }

    /// One pass. Returns how long to sleep, or None to go again at once (more work waiting).
    fn cycle(&mut self) -> Option<Duration> {
        let poll = crate::gucs::poll_interval();
        // Every commit that captured a change wakes the worker; when there is nothing it may
        // do, it must find that out without running SQL.
        if self.client.is_none() {
            self.slot.set_state(if self.settings.base.is_some() {
                WorkerState::Misconfigured
            } else {
                WorkerState::NotConfigured
            });
            self.shared.paused_reason.store(0, Ordering::Relaxed);
            return Some(poll.max(policy::IDLE_NAP));
        }
        let was_paused = self.pause.is_paused();
        let probe = match self.pause.step(Instant::now()) {
            Step::Sleep(left) => {
                self.slot.set_state(WorkerState::Paused);
                return Some(left.min(poll.max(Duration::from_millis(100))));
            }
            Step::Probe => true,
            Step::Deliver => {
                // A throttle or credential pause that ended: try real work; a new refusal
                // pauses again. (The reason is shared by every worker: only the one that
                // paused clears it.)
                if was_paused {
                    self.shared.paused_reason.store(0, Ordering::Relaxed);
                }
                false
            }
        };
        if let Some(at) = self.extension_absent {
            if let Some(left) = policy::EXTENSION_RECHECK.checked_sub(at.elapsed()) {
                return Some(left);
            }
        }
        let schema = match &self.schema {
            Some((at, s)) if at.elapsed() < policy::CATALOG_TTL => s.clone(),
            _ => match crate::subxact::transaction_flat(source::extension_for_worker) {
                Ok(source::Extension::In(s)) => {
                    self.schema = Some((Instant::now(), s.clone()));
                    self.extension_absent = None;
                    s
                }
                Ok(source::Extension::Missing) => {
                    self.slot.set_state(WorkerState::NoExtension);
                    self.extension_absent = Some(Instant::now());
                    return Some(poll.max(policy::IDLE_NAP));
                }
                Ok(source::Extension::OtherVersion) => {
                    self.slot.set_state(WorkerState::NeedsUpdate);
                    self.extension_absent = Some(Instant::now());
                    return Some(poll.max(policy::IDLE_NAP));
                }
                Err(e) => return self.failed_cycle("reading the extension's schema", &e),
            },
        };
        if probe && !self.probe() {
            return Some(Duration::from_millis(10));
        }
        let batch = crate::gucs::batch_size();
        let started = Instant::now();
        let claimed = match crate::subxact::transaction_flat(|| {
            claim::claim(
                &schema,
                batch,
                crate::gucs::lease_time_ms(),
                &Default::default(),
                &mut self.floor,
                Some(&mut self.leases),
            )
        }) {
            Ok(c) => c,
            Err(e) => return self.failed_cycle("claiming", &e),
        };
        if claimed.is_empty() {
            self.slot.set_state(if self.pause.is_paused() {
                WorkerState::Paused
            } else {
                WorkerState::Idle
            });
            self.slot.batch.store(0, Ordering::Relaxed);
            return Some(poll);
        }
        self.slot.set_state(WorkerState::Working);
        let mut next = Next::claimed(claimed);
        // While a full batch is in flight the next one is claimed and mapped (a backlog is
        // waiting); a bounded number of rounds, so that settings and signals are looked at.
        let mut round = 0;
        loop {
            round += 1;
            let size = next.len();
            let full = size as i64 >= batch;
            self.slot.batch.store(size as u64, Ordering::Relaxed);
            let ahead = full && round < ROUNDS_PER_CYCLE;
            match self.deliver(&schema, next, ahead) {
                Ok(Some(n)) if n.len() > 0 => next = n,
                // A full batch means more is waiting: go on at once. Otherwise sleep; a commit
                // that captured something while this batch was out has already set the latch.
                Ok(_) if full => return None,
                Ok(_) => {
                    let ended = Instant::now();
                    // A cycle of several rounds overlapped their claims and sends: its length
                    // says nothing of one batch's cost.
                    if round == 1 {
                        self.cost.observe(ended - started, size);
                    }
                    self.paced = fhir_sync_core::pace::next_claim(
                        started,
                        ended,
                        size,
                        &self.cost,
                        crate::gucs::linger(),
                    );
                    return Some(poll);
                }
                Err(e) => return self.failed_cycle("delivering", &e),
            }
        }
    }

    /// A cycle that hit a PostgreSQL error (the extension being dropped, a table gone, a lock
    /// not granted in time): log it and try again later. What it claimed is handed back.
    /// The log names the step and the SQLSTATE, never PostgreSQL's message (it may quote a
    /// value); the same problem persisting is logged again only every FAILURE_RELOG.
    fn failed_cycle(
        &mut self,
        step: &'static str,
        error: &crate::error::FhirSyncError,
    ) -> Option<Duration> {
        self.tracks = None;
        self.floor.reset();
        self.schema = None;
        claim::forget_outbox();
        // Nothing of the cycle is in flight any more (deliver answers what it sent before it
        // fails): what it claimed and did not settle may be claimed again, by any worker.
        self.leases.clear();
        let what = error.log_form();
        let now = Instant::now();
        let repeat = matches!(&self.last_failure, Some((s, w, at)) if *s == step && *w == what && now.duration_since(*at) < policy::FAILURE_RELOG);
        if !repeat {
            let trouble = policy::Trouble::of(&error.sqlstate());
            let explanation = trouble.explanation();
            if trouble.needs_a_dba() {
                pgrx::warning!("fhir_sync worker: cycle failed while {step}: {what}{explanation}");
            } else {
                pgrx::log!("fhir_sync worker: cycle failed while {step}: {what}{explanation}");
            }
            self.last_failure = Some((step, what, now));
        }
        self.slot
            .last_error_ms
            .store(shmem::now_ms(), Ordering::Relaxed);
        Some(policy::FAILED_CYCLE_NAP.max(crate::gucs::poll_interval()))
    }

    /// Is the server reachable again? Any HTTP answer says yes.
    fn probe(&mut self) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        if client.reachable() {
            pgrx::log!("fhir_sync worker: FHIR server reachable again, resuming delivery");
            self.pause.lift();
            self.shared.paused_reason.store(0, Ordering::Relaxed);
            true
        } else {
            self.pause.probe_failed(Instant::now());
            false
        }
    }

    fn pause_for(&mut self, class: Class, wait: Duration) {
        if self.pause.pause(class, wait, Instant::now()) {
            match class {
                Class::Unreachable => pgrx::log!("fhir_sync worker: FHIR server unreachable, pausing delivery"),
                Class::Auth => pgrx::warning!(
                    "fhir_sync worker: FHIR server rejected the credentials (HTTP 401/403), pausing delivery; check fhir_sync.auth and its secret, then SELECT pg_reload_conf()"
                ),
                _ => pgrx::log!("fhir_sync worker: FHIR server asked to slow down, pausing {} ms", wait.as_millis()),
            }
        }
        self.shared
            .paused_reason
            .store(class.index() as u32, Ordering::Relaxed);
        self.shared
            .paused_until_ms
            .store(shmem::now_ms() + wait.as_millis() as i64, Ordering::Relaxed);
    }

    fn tracks(&mut self, schema: &str, claimed: &[Claimed]) -> Result<Tracks, FhirSyncError> {
        if let Some((at, s, t)) = &self.tracks {
            if at.elapsed() < policy::CATALOG_TTL
                && s == schema
                && claimed.iter().all(|c| t.contains_key(&c.resource_table))
            {
                return Ok(t.clone());
            }
        }
        let t = std::rc::Rc::new(crate::subxact::transaction_flat(|| {
            source::load_tracks(schema)
        })?);
        self.tracks = Some((Instant::now(), schema.to_string(), t.clone()));
        Ok(t)
    }
}
