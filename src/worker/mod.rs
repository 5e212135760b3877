//! The background worker: claim → map → send → settle, woken at commit.
//!
//! Discipline (after pg_net's worker): transactions are short and never open during HTTP;
//! a PostgreSQL error in a cycle is caught, logged and the cycle abandoned (leases expire),
//! never a crash loop; the launcher starts a new worker after SIGTERM (pg_terminate_backend) or a
//! crash; SIGHUP reloads settings; a database without the extension is waited on quietly.

pub mod claim;
pub mod map;
pub mod policy;
mod pool;
pub mod response;
pub mod send;
pub mod settle;

use crate::error::FhirSyncError;
use crate::http::{Auth, Client, Method, Response};
use crate::shmem::{self, WorkerState};
use crate::source;
use claim::Claimed;
use map::{Action, Mode};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use policy::{Class, Transport, Verdict};
use response::{describe_failure, operation_outcome};
use settle::Settlement;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Settings that shape the HTTP client; a change rebuilds it.
#[derive(Clone, PartialEq, Debug)]
struct ClientSettings {
    base: Option<String>,
    timeout: Duration,
    in_flight: usize,
    auth: Auth,
    ca_file: Option<String>,
    /// Why the settings cannot be used (an unreadable secret file): nothing is sent until a
    /// reload fixes it.
    problem: Option<String>,
}

impl ClientSettings {
    fn read() -> Self {
        use crate::gucs::{self as g, AuthMode};
        let mut problem = None;
        let mut secret = |r: Result<Option<String>, String>| match r {
            Ok(v) => v.unwrap_or_default(),
            Err(e) => {
                problem = Some(e);
                String::new()
            }
        };
        let auth = match g::auth() {
            AuthMode::None => Auth::None,
            AuthMode::Bearer => Auth::Bearer(secret(g::auth_token())),
            AuthMode::Basic => Auth::Basic(crate::http::base64(
                format!(
                    "{}:{}",
                    g::auth_username().unwrap_or_default(),
                    secret(g::auth_password())
                )
                .as_bytes(),
            )),
            AuthMode::Oauth2 => Auth::OAuth2 {
                token_url: g::oauth_token_url().unwrap_or_default(),
                client_id: g::oauth_client_id().unwrap_or_default(),
                client_secret: secret(g::oauth_client_secret()),
                scope: g::oauth_scope(),
            },
        };
        let base = g::server_url();
        if problem.is_none()
            && !g::allow_http_credentials()
            && base
                .as_deref()
                .is_some_and(|b| crate::http::credentials_in_clear(b, &auth))
        {
            problem = Some(format!(
                "fhir_sync.auth = '{}' would send credentials over plain http://; use https, or set fhir_sync.allow_http_credentials = on",
                g::auth_name()
            ));
        }
        ClientSettings {
            base,
            timeout: g::http_timeout(),
            in_flight: g::max_in_flight(),
            auth,
            ca_file: g::ca_file(),
            problem,
        }
    }
}

struct Pause {
    class: Class,
    until: Instant,
    /// Next probe interval, doubling while the problem lasts.
    backoff: Duration,
}

struct Worker {
    slot: &'static shmem::WorkerSlot,
    shared: &'static shmem::Shared,
    settings: ClientSettings,
    client: Option<std::sync::Arc<Client>>,
    pause: Option<Pause>,
    rng: u64,
    /// Tracked tables, read at most every TRACKS_TTL (or sooner when a claim names a table
    /// not in it): catalog joins on every cycle would cost more than the delivery itself.
    tracks: Option<(Instant, String, Tracks)>,
    /// The extension's schema, re-read as often as the tracked tables.
    schema: Option<(Instant, String)>,
    /// Concurrency actually used, at most fhir_sync.max_in_flight: halved when the server
    /// answers 5xx or 429 (it is struggling, or serialises writes), grown by one per clean tier.
    in_flight: usize,
    /// When the next claim may start: set by a cycle that found more than one resource (changes
    /// arrive faster than cycles end), fhir_sync.linger after that cycle began.
    paced: Option<Instant>,
    /// Where the claim's scan of fresh changes starts (claim::Floor).
    floor: claim::Floor,
    /// The last failed cycle's step and error, and when it was logged.
    last_failure: Option<(&'static str, String, Instant)>,
}

/// How often a cycle failure that persists (same step, same error) is logged again.
const FAILURE_RELOG: Duration = Duration::from_secs(60);

const TRACKS_TTL: Duration = Duration::from_secs(2);

/// Batches delivered back to back in one cycle before the worker looks at its latch, signals
/// and settings again.
const ROUNDS_PER_CYCLE: usize = 16;

/// A claimed batch waiting for its round; its first tier may be mapped already.
struct Next {
    claimed: Vec<Claimed>,
    mapped: Option<Mapped>,
}

impl Next {
    fn len(&self) -> usize {
        self.claimed.len() + self.mapped.as_ref().map_or(0, |m| m.tier.len())
    }
}

/// One tier, mapped: the actions, and the requests made of them.
struct Mapped {
    tier: Vec<Claimed>,
    actions: Vec<Action>,
    requests: Vec<send::Outgoing>,
    /// For each claimed resource, its request (None: settled without one).
    request_of: Vec<Option<usize>>,
    deps: Vec<(pg_sys::Oid, String)>,
    /// Set once the requests are on their way (`requests` is then empty).
    flight: Option<send::InFlight>,
}

type Tracks = std::rc::Rc<HashMap<pg_sys::Oid, source::Track>>;

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn fhir_sync_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let index =
        unsafe { i32::from_polymorphic_datum(arg, false, pg_sys::INT4OID) }.unwrap_or(0) as usize;
    let db = BackgroundWorker::get_extra().to_string();
    let Some(shared) = shmem::shared() else {
        return;
    };
    let slot = &shared.workers[index.min(shmem::MAX_WORKERS - 1)];
    // fhir_sync.username: the role the launcher checked (it starts no worker for a role that
    // cannot log in); empty, the bootstrap superuser.
    let role = crate::gucs::username();
    BackgroundWorker::connect_worker_to_spi(Some(&db), role.as_deref());
    slot.claim(unsafe { pg_sys::MyDatabaseId });
    pgrx::log!("fhir_sync worker started for database \"{db}\"");

    // The worker's bookkeeping may be lost in a crash without harm (a lost mark means an
    // idempotent re-send), so it need not wait for WAL flush; nothing it runs may resolve names
    // through a search_path a user controls; and the outbox it reads is hot in shared buffers,
    // so random reads cost what sequential ones do — without that, the planner trades the
    // partial indexes for sequential scans of the whole outbox once the backlog is a few
    // percent of it.
    crate::sandbox::enter_worker();
    // (search_path, lock_timeout and the statement timeout are set at the start of every
    // transaction: sandbox::worker_transaction_start.)
    if let Err(e) = crate::subxact::transaction_flat(|| {
        Spi::run(
            "SET synchronous_commit = off; SET random_page_cost = 1.1; \
             SET application_name = 'fhir_sync worker'",
        )
        .map_err(Into::into)
    }) {
        pgrx::warning!(
            "fhir_sync worker: could not apply its session settings: {}",
            e.log_form()
        );
    }

    let mut w = Worker {
        slot,
        shared,
        settings: ClientSettings::read(),
        client: None,
        pause: None,
        rng: seed(),
        tracks: None,
        schema: None,
        in_flight: usize::MAX,
        paced: None,
        floor: Default::default(),
        last_failure: None,
    };
    w.rebuild_client();
    loop {
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
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            let s = ClientSettings::read();
            if s != w.settings {
                w.settings = s;
                w.rebuild_client();
            }
            // New credentials or a new URL deserve an immediate try.
            w.pause = None;
        }
        let nap = w.cycle();
        if let Some(nap) = nap {
            if !BackgroundWorker::wait_latch(Some(nap)) {
                break;
            }
            w.linger();
        } else {
            unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
            pgrx::check_for_interrupts!();
        }
    }
    slot.release();
    pgrx::log!("fhir_sync worker for database \"{db}\" stopping");
    // The launcher starts a new worker when this one is gone, unless the database is going.
    unsafe { pg_sys::proc_exit(0) };
}

fn seed() -> u64 {
    (shmem::now_ms() as u64) ^ ((unsafe { pg_sys::MyProcPid } as u64) << 32) | 1
}

impl Worker {
    fn rebuild_client(&mut self) {
        self.client = None;
        let Some(base) = self.settings.base.clone() else {
            return;
        };
        if let Some(problem) = &self.settings.problem {
            pgrx::log!("fhir_sync worker: sending nothing: {problem}");
            return;
        }
        match Client::new(
            base,
            self.settings.timeout,
            self.settings.in_flight,
            self.settings.auth.clone(),
            self.settings.ca_file.as_deref(),
        ) {
            Ok(c) => self.client = Some(std::sync::Arc::new(c)),
            Err(e) => pgrx::warning!("fhir_sync: {e}"),
        }
    }

    /// SIGTERM (shutdown, pg_terminate_backend) or DROP DATABASE: stop starting requests.
    fn must_leave(&self) -> bool {
        let shutdown = unsafe { pg_sys::ShutdownRequestPending != 0 };
        shutdown || self.slot.leave.load(Ordering::Acquire)
    }

    /// Paused by the server, or leaving: nothing new goes out.
    fn holding_back(&self) -> bool {
        self.pause.is_some() || self.must_leave()
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
            return Some(poll.max(Duration::from_secs(5)));
        }
        if let Some(p) = &self.pause {
            if Instant::now() < p.until {
                self.slot.set_state(WorkerState::Paused);
                return Some((p.until - Instant::now()).min(poll.max(Duration::from_millis(100))));
            }
        }
        let schema = match &self.schema {
            Some((at, s)) if at.elapsed() < TRACKS_TTL => s.clone(),
            _ => match crate::subxact::transaction_flat(source::extension_schema) {
                Ok(Some(s)) => {
                    self.schema = Some((Instant::now(), s.clone()));
                    s
                }
                Ok(None) => {
                    self.slot.set_state(WorkerState::NoExtension);
                    return Some(poll.max(Duration::from_secs(5)));
                }
                Err(e) => return self.failed_cycle("reading the extension's schema", &e),
            },
        };
        if let Some(p) = &self.pause {
            if p.class == Class::Unreachable {
                if !self.probe() {
                    return Some(Duration::from_millis(10));
                }
            } else {
                // Throttle or credential pause over: try real work; a new refusal pauses again.
                self.pause = None;
                self.shared.paused_reason.store(0, Ordering::Relaxed);
            }
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
            )
        }) {
            Ok(c) => c,
            Err(e) => return self.failed_cycle("claiming", &e),
        };
        if claimed.is_empty() {
            self.slot.set_state(if self.pause.is_some() {
                WorkerState::Paused
            } else {
                WorkerState::Idle
            });
            self.slot.batch.store(0, Ordering::Relaxed);
            return Some(poll);
        }
        self.slot.set_state(WorkerState::Working);
        let mut next = Next {
            claimed,
            mapped: None,
        };
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
                    self.paced = (size > 1).then(|| started + crate::gucs::linger());
                    return Some(poll);
                }
                Err(e) => return self.failed_cycle("delivering", &e),
            }
        }
    }

    /// A cycle that hit a PostgreSQL error (the extension being dropped, a table gone, a lock
    /// not granted in time): log it and try again later. The leases it held expire on their own.
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
        let what = error.log_form();
        let now = Instant::now();
        let repeat = matches!(&self.last_failure, Some((s, w, at)) if *s == step && *w == what && now.duration_since(*at) < FAILURE_RELOG);
        if !repeat {
            let hint = match error.pg().map(|p| p.code) {
                Some(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE) => "; the worker's role lacks a grant: SELECT fhir_sync_grant_worker('<fhir_sync.username>')",
                _ => "",
            };
            pgrx::warning!("fhir_sync worker: cycle failed while {step}: {what}{hint}");
            self.last_failure = Some((step, what, now));
        }
        self.slot
            .last_error_ms
            .store(shmem::now_ms(), Ordering::Relaxed);
        Some(Duration::from_secs(1).max(crate::gucs::poll_interval()))
    }

    /// Is the server reachable again? Any HTTP answer says yes.
    fn probe(&mut self) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        if !client.reachable() {
            let p = self.pause.as_mut().expect("probing while paused");
            p.backoff = (p.backoff * 2).min(Duration::from_secs(30));
            p.until = Instant::now() + p.backoff;
            false
        } else {
            pgrx::log!("fhir_sync worker: FHIR server reachable again, resuming delivery");
            self.pause = None;
            self.shared.paused_reason.store(0, Ordering::Relaxed);
            true
        }
    }

    fn pause_for(&mut self, class: Class, wait: Duration) {
        if self.pause.as_ref().map(|p| p.class) != Some(class) {
            match class {
                Class::Unreachable => pgrx::log!("fhir_sync worker: FHIR server unreachable, pausing delivery"),
                Class::Auth => pgrx::warning!(
                    "fhir_sync worker: FHIR server rejected the credentials (HTTP 401/403), pausing delivery; check fhir_sync.auth and its secret, then SELECT pg_reload_conf()"
                ),
                _ => pgrx::log!("fhir_sync worker: FHIR server asked to slow down, pausing {} ms", wait.as_millis()),
            }
        }
        let backoff = self
            .pause
            .as_ref()
            .map(|p| p.backoff)
            .unwrap_or(Duration::from_millis(500));
        self.pause = Some(Pause {
            class,
            until: Instant::now() + wait,
            backoff,
        });
        self.shared
            .paused_reason
            .store(class.index() as u32, Ordering::Relaxed);
        self.shared
            .paused_until_ms
            .store(shmem::now_ms() + wait.as_millis() as i64, Ordering::Relaxed);
    }

    fn tracks(&mut self, schema: &str, claimed: &[Claimed]) -> Result<Tracks, FhirSyncError> {
        if let Some((at, s, t)) = &self.tracks {
            if at.elapsed() < TRACKS_TTL
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

    /// Delivers one claimed batch, tier by tier (a Patient before what refers to it). With
    /// `ahead`, the next batch is claimed while the last tier is in flight, and its first tier
    /// mapped if it refers to nothing; it is returned for the next round. It never holds a
    /// resource that is in flight: the claim passes those over.
    fn deliver(
        &mut self,
        schema: &str,
        batch: Next,
        ahead: bool,
    ) -> Result<Option<Next>, FhirSyncError> {
        let tracks = self.tracks(schema, &batch.claimed)?;
        let mut tiers: [Vec<Claimed>; 3] = Default::default();
        for c in batch.claimed {
            let t = tracks
                .get(&c.resource_table)
                .map(|t| t.mapper.tier())
                .unwrap_or(0);
            tiers[t].push(c);
        }
        let mut mapped = batch.mapped;
        let last = tiers.iter().rposition(|t| !t.is_empty());
        if mapped.is_some() {
            debug_assert!(
                tiers[0].is_empty(),
                "a mapped first tier is not claimed again"
            );
        }
        let mut next: Option<Result<Next, FhirSyncError>> = None;
        for (t, tier) in tiers.into_iter().enumerate() {
            let is_last = t == last.unwrap_or(0);
            let work = match (t, mapped.take()) {
                (0, Some(m)) => m,
                _ if tier.is_empty() => continue,
                _ => {
                    if self.holding_back() {
                        self.release(schema, &tier)?;
                        continue;
                    }
                    self.map(schema, &tracks, tier)?
                }
            };
            // Requests already on their way are seen through whatever happened meanwhile.
            if work.flight.is_none() && self.holding_back() {
                self.release(schema, &work.tier)?;
                continue;
            }
            let in_flight: claim::ResourcesInFlight = work
                .tier
                .iter()
                .map(|c| (c.resource_table, c.resource_key.clone()))
                .collect();
            let Mapped {
                tier,
                actions,
                requests,
                request_of,
                deps,
                flight,
            } = work;
            let flight = match flight {
                Some(f) => f,
                None => self.launch(requests),
            };
            if ahead && is_last {
                next = Some(self.claim_ahead(schema, &tracks, &in_flight));
            }
            let responses = self.collect(flight);
            let settlement = self.judge(&tier, &actions, &request_of, &responses, deps);
            if is_last && !self.holding_back() {
                // The next batch's first tier refers to nothing in this one: it goes out now,
                // and its HTTP overlaps this settle.
                if let Some(Ok(Next {
                    mapped: Some(m), ..
                })) = &mut next
                {
                    m.flight = Some(self.launch(std::mem::take(&mut m.requests)));
                }
            }
            if let Err(e) = self.settle(schema, &settlement) {
                // The batch claimed ahead goes back at once rather than when its lease ends
                // (after the answers to what of it was sent: a re-send is harmless).
                if let Some(Ok(n)) = next {
                    let _ = self.release(schema, &n.claimed);
                    if let Some(m) = n.mapped {
                        if let Some(f) = m.flight {
                            self.collect(f);
                        }
                        let _ = self.release(schema, &m.tier);
                    }
                }
                return Err(e);
            }
        }
        next.transpose()
    }

    /// Claims the next batch while the current one is in flight, and maps its first tier (it
    /// refers to nothing that could be in flight).
    fn claim_ahead(
        &mut self,
        schema: &str,
        tracks: &Tracks,
        in_flight: &claim::ResourcesInFlight,
    ) -> Result<Next, FhirSyncError> {
        let claimed = crate::subxact::transaction_flat(|| {
            claim::claim(
                schema,
                crate::gucs::batch_size(),
                crate::gucs::lease_time_ms(),
                in_flight,
                &mut self.floor,
            )
        })?;
        if claimed
            .iter()
            .any(|c| !tracks.contains_key(&c.resource_table))
        {
            // A table tracked since: mapped in its round, with the tracks read again.
            return Ok(Next {
                claimed,
                mapped: None,
            });
        }
        let (first, rest): (Vec<Claimed>, Vec<Claimed>) = claimed
            .into_iter()
            .partition(|c| tracks[&c.resource_table].mapper.tier() == 0);
        let mapped = if first.is_empty() {
            None
        } else {
            Some(self.map(schema, tracks, first)?)
        };
        Ok(Next {
            claimed: rest,
            mapped,
        })
    }

    /// Starts sending, at the concurrency the server currently allows.
    fn launch(&mut self, requests: Vec<send::Outgoing>) -> send::InFlight {
        let mut g = crate::gucs::grouping();
        g.in_flight = self.in_flight(g.in_flight);
        let client = self.client.clone().expect("checked in cycle");
        send::start(&client, requests, g)
    }

    /// The answers, or None for what was not sent because the worker must go.
    fn collect(&self, flight: send::InFlight) -> Vec<Option<Response>> {
        flight.finish(&|| self.must_leave())
    }

    /// Maps one tier and builds its requests.
    fn map(
        &mut self,
        schema: &str,
        tracks: &Tracks,
        tier: Vec<Claimed>,
    ) -> Result<Mapped, FhirSyncError> {
        let mut deps = Vec::new();
        let mut actions = crate::subxact::transaction_flat(|| {
            map::plan(schema, tracks, &tier, Mode::Deliver, &mut deps)
        })?;
        let mut requests = Vec::new();
        let mut request_of = vec![None; tier.len()];
        for (i, a) in actions.iter_mut().enumerate() {
            let req = match a {
                Action::Put {
                    path,
                    body,
                    if_match,
                    ..
                } => send::Outgoing {
                    method: Method::Put,
                    path: path.clone(),
                    // Moved, not copied: judge() needs only the kind and identifier.
                    body: Some(std::mem::take(&mut **body)),
                    if_match: if_match.clone(),
                },
                Action::Delete { path } => send::Outgoing {
                    method: Method::Delete,
                    path: path.clone(),
                    body: None,
                    if_match: None,
                },
                _ => continue,
            };
            request_of[i] = Some(requests.len());
            requests.push(req);
        }
        Ok(Mapped {
            tier,
            actions,
            requests,
            request_of,
            deps,
            flight: None,
        })
    }

    /// Hands changes back without spending attempts: nothing was sent.
    fn release(&mut self, schema: &str, tier: &[Claimed]) -> Result<(), FhirSyncError> {
        let s = Settlement {
            release: tier.iter().flat_map(|c| c.outbox_ids.clone()).collect(),
            ..Default::default()
        };
        self.settle(schema, &s)
    }

    /// Records a settlement in its own transaction. Changes handed back may lie below the
    /// claim's floor: the next claim scans from the front.
    fn settle(&mut self, schema: &str, s: &Settlement) -> Result<(), FhirSyncError> {
        if !s.release.is_empty() {
            self.floor.reset();
        }
        crate::subxact::transaction_flat(|| settle::settle(schema, s))
    }

    /// Turns actions and responses into a settlement, updates the counters, and pauses the
    /// worker when the server asks for it.
    fn judge(
        &mut self,
        tier: &[Claimed],
        actions: &[Action],
        request_of: &[Option<usize>],
        responses: &[Option<Response>],
        deps: Vec<(pg_sys::Oid, String)>,
    ) -> Settlement {
        let mut s = Settlement {
            dependencies: deps,
            ..Default::default()
        };
        let max_retries = crate::gucs::max_retries();
        let mut pause: Option<(Class, Duration)> = None;
        for (i, c) in tier.iter().enumerate() {
            let ids = c.outbox_ids.clone();
            let action = &actions[i];
            let response = request_of[i]
                .and_then(|r| responses.get(r))
                .and_then(|r| r.as_ref());
            match (action, response) {
                (Action::AlreadyGone, _) => s.delivered.push(settle::Delivered {
                    outbox_ids: ids,
                    resource_table: c.resource_table,
                    resource_key: c.resource_key.clone(),
                    resource_type: c.resource_type.clone(),
                    fhir_id: None,
                    version: None,
                    identifier: None,
                    deleted: true,
                }),
                (Action::Wait(reason), _) => {
                    let delay = (c.age_s * 100.0).clamp(200.0, 30_000.0) as i64;
                    s.waits.push(settle::Wait {
                        outbox_ids: ids,
                        delay_ms: delay,
                        reason: reason.clone(),
                    });
                }
                (Action::Fail(class, error), _) => {
                    pgrx::warning!("fhir_sync worker: outbox rows {:?} dead-lettered ({}): no request was made", c.outbox_ids, class.name());
                    self.shared.failed_total.fetch_add(1, Ordering::Relaxed);
                    s.dead.push(settle::DeadLetter {
                        outbox_ids: ids,
                        class: class.name(),
                        error: error.clone(),
                        http_status: None,
                        outcome: None,
                        attempted: false,
                    });
                }
                (_, None) => s.release.extend(ids),
                (action, Some(r)) => {
                    let is_delete = matches!(action, Action::Delete { .. });
                    let status = match r.transport {
                        Transport::Status(st) => Some(st as i32),
                        _ => None,
                    };
                    let versioned = matches!(
                        action,
                        Action::Put {
                            if_match: Some(_),
                            ..
                        }
                    );
                    let verdict = policy::classify_request(&r.transport, is_delete, versioned);
                    if verdict != Verdict::Delivered {
                        let class = match verdict {
                            Verdict::Retry(c) | Verdict::Pause(c) | Verdict::DeadLetter(c) => c,
                            Verdict::Delivered => Class::Transient,
                        };
                        self.shared.record_call_error(class.index());
                        self.slot
                            .last_error_class
                            .store(class.index() as u32, Ordering::Relaxed);
                        self.slot
                            .last_error_ms
                            .store(shmem::now_ms(), Ordering::Relaxed);
                    }
                    match verdict {
                        Verdict::Delivered => {
                            let (fhir_id, version) = if is_delete {
                                (None, None)
                            } else {
                                match response::resource_id(r) {
                                    Ok(ids) => ids,
                                    Err(why) => {
                                        // Applied by the server, but what it calls the resource
                                        // cannot address it: a DBA must look before updates go on.
                                        self.shared.failed_total.fetch_add(1, Ordering::Relaxed);
                                        pgrx::warning!("fhir_sync worker: outbox rows {:?} dead-lettered (rejected): {why}", c.outbox_ids);
                                        s.dead.push(settle::DeadLetter {
                                            outbox_ids: ids,
                                            class: Class::Rejected.name(),
                                            error: format!("HTTP {}: {why}", status.unwrap_or(0)),
                                            http_status: status,
                                            outcome: None,
                                            attempted: true,
                                        });
                                        continue;
                                    }
                                }
                            };
                            let identifier = match action {
                                Action::Put { identifier, .. } => Some(identifier.clone()),
                                _ => None,
                            };
                            self.shared
                                .processed_total
                                .fetch_add(ids.len() as u64, Ordering::Relaxed);
                            self.slot
                                .last_success_ms
                                .store(shmem::now_ms(), Ordering::Relaxed);
                            s.delivered.push(settle::Delivered {
                                outbox_ids: ids,
                                resource_table: c.resource_table,
                                resource_key: c.resource_key.clone(),
                                resource_type: c.resource_type.clone(),
                                fhir_id,
                                version,
                                identifier,
                                deleted: is_delete,
                            });
                        }
                        Verdict::Pause(class) => {
                            let wait = if class == Class::Auth {
                                Duration::from_secs(60)
                            } else {
                                Duration::from_millis(500)
                            };
                            pause = Some((class, wait));
                            s.release.extend(ids);
                        }
                        Verdict::Retry(class) => {
                            self.shared.failed_total.fetch_add(1, Ordering::Relaxed);
                            let attempts = c.attempts + 1;
                            let error = describe_failure(r);
                            let retry_after = r
                                .retry_after
                                .as_deref()
                                .and_then(|v| policy::parse_retry_after(v, chrono::Utc::now()));
                            if let Some(ra) = retry_after {
                                pause = Some((Class::Transient, ra));
                            } else if status == Some(429) {
                                pause = Some((Class::Transient, Duration::from_secs(1)));
                            }
                            if policy::exhausted(attempts, max_retries) {
                                pgrx::warning!("fhir_sync worker: outbox rows {:?} dead-lettered after {attempts} attempts ({})", c.outbox_ids, class.name());
                                s.dead.push(settle::DeadLetter {
                                    outbox_ids: ids,
                                    class: Class::Exhausted.name(),
                                    error: format!("gave up after {attempts} attempts: {error}"),
                                    http_status: status,
                                    outcome: operation_outcome(r),
                                    attempted: true,
                                });
                            } else {
                                let j = self.jitter();
                                let delay = policy::backoff(attempts, retry_after, j);
                                s.retries.push(settle::Retry {
                                    outbox_ids: ids,
                                    delay_ms: delay.as_millis() as i64,
                                    error,
                                    class: class.name(),
                                    http_status: status,
                                });
                            }
                        }
                        Verdict::DeadLetter(class) => {
                            self.shared.failed_total.fetch_add(1, Ordering::Relaxed);
                            pgrx::warning!(
                                "fhir_sync worker: outbox rows {:?} dead-lettered: HTTP {}",
                                c.outbox_ids,
                                status.unwrap_or(0)
                            );
                            s.dead.push(settle::DeadLetter {
                                outbox_ids: ids,
                                class: class.name(),
                                error: describe_failure(r),
                                http_status: status,
                                outcome: operation_outcome(r),
                                attempted: true,
                            });
                        }
                    }
                }
            }
        }
        let overloaded = responses
            .iter()
            .flatten()
            .any(|r| matches!(r.transport, Transport::Status(429 | 500 | 502 | 503 | 504)));
        if overloaded {
            self.in_flight = (self.in_flight / 2).max(1);
        } else if !responses.is_empty() {
            self.in_flight = self.in_flight.saturating_add(1);
        }
        let dead_rows: usize = s.dead.iter().map(|d| d.outbox_ids.len()).sum();
        self.shared
            .dead_lettered_total
            .fetch_add(dead_rows as u64, Ordering::Relaxed);
        if let Some((class, wait)) = pause {
            self.pause_for(class, wait);
        }
        s
    }
}
