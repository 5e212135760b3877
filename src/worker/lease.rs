//! Leases in shared memory: the resources this worker has claimed and not settled, published in
//! its `LeaseSlot` for the other workers of its database (`fhir_sync_core::lease` keeps the book).
//!
//! Why it is safe without a row lock: claims are serialised per database by the claim lock
//! (claim.rs), a worker publishes its new leases before its claim transaction ends, and it ends a
//! lease only after the settle that recorded the outcome has committed. So a claim sees every
//! lease of a resource whose pending changes it can still see. A worker that is gone (its slot's
//! pid cleared, or a crash that reset shared memory) holds nothing; a live one that neither
//! claimed nor sent for fhir_sync.lease_time is taken to be stuck, as a row lease used to expire.

use super::claim::Claimed;
use crate::shmem::{self, LeaseSlot};
use fhir_sync_core::lease::{self, Book};
use pgrx::pg_sys;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The key of a claimed resource.
pub fn key_of(table: pg_sys::Oid, resource_key: &str) -> u64 {
    lease::key(table.to_u32(), resource_key)
}

/// The key of an identifier a first write resolves.
pub fn identity_key(i: &fhir_sync_core::identity::Identity) -> u64 {
    lease::identity_key(&i.resource_type, &i.system, &i.value)
}

fn key_of_claimed(c: &Claimed) -> u64 {
    key_of(c.resource_table, &c.resource_key)
}

/// This worker's leases, and the identifiers its first writes in flight resolve.
pub struct Leases {
    slot: &'static LeaseSlot,
    book: Book,
    /// Each resource whose first write is in flight → its identifier's key.
    reserving: HashMap<u64, u64>,
    /// How many of those resources reserve each identifier key (two identifiers that hash alike
    /// share an entry).
    sharing: HashMap<u64, u64>,
    /// The identifier keys published.
    identities: Book,
}

impl Leases {
    /// The slot's leases, all ended (a worker that had the slot before may have left some).
    pub fn new(slot: &'static LeaseSlot) -> Self {
        for k in slot.keys.iter().chain(slot.identities.iter()) {
            k.store(0, Ordering::Relaxed);
        }
        slot.ids.store(0, Ordering::Relaxed);
        slot.identities_high.store(0, Ordering::Release);
        slot.high.store(0, Ordering::Release);
        Leases {
            slot,
            book: Book::default(),
            reserving: HashMap::new(),
            sharing: HashMap::new(),
            identities: Book::default(),
        }
    }

    /// Outbox rows under this worker's leases.
    pub fn ids(&self) -> u64 {
        self.book.ids()
    }

    /// How many more resources this worker may claim.
    pub fn room(&self) -> usize {
        self.book.room()
    }

    /// Publishes leases on `claimed` until `lease_ms` from now. Only under the claim lock.
    pub fn hold(&mut self, claimed: &[Claimed], lease_ms: i64) {
        let keys: Vec<(u64, u64)> = claimed
            .iter()
            .map(|c| (key_of_claimed(c), c.outbox_ids.len() as u64))
            .collect();
        let writes = self.book.hold(&keys);
        self.apply(&writes);
        self.refresh(lease_ms);
    }

    /// Whether this worker holds `key` (a resource in flight, or one of another table or key
    /// that hashes alike: either way not to be claimed again until it is settled).
    pub fn holds(&self, key: u64) -> bool {
        self.book.holds(key)
    }

    /// Extends every lease to `lease_ms` from now: a batch whose later tiers go out long after
    /// its claim must not be taken for abandoned while they are on their way.
    pub fn refresh(&self, lease_ms: i64) {
        self.slot
            .until_ms
            .store(shmem::now_ms() + lease_ms, Ordering::Release);
    }

    /// Ends the leases of `claimed`, and their identifiers' reservations: only once what was
    /// settled of them has committed (a first write that did not succeed is reserved in
    /// fhir_sync_state by then).
    pub fn release(&mut self, claimed: &[Claimed]) {
        let keys: Vec<u64> = claimed.iter().map(key_of_claimed).collect();
        self.unreserve(&keys);
        let writes = self.book.release(&keys);
        self.apply(&writes);
    }

    /// Ends every lease and reservation (a failed cycle: nothing of it is in flight any more).
    pub fn clear(&mut self) {
        self.reserving.clear();
        self.sharing.clear();
        let writes = self.identities.clear();
        apply_to(&self.slot.identities, &self.slot.identities_high, &writes);
        let writes = self.book.clear();
        self.apply(&writes);
    }

    /// Publishes that first writes resolving these identifiers are about to be sent, each as
    /// (its resource's key, `lease::identity_key`). Only while this transaction holds the
    /// identifiers' advisory locks: another worker reads them under the same locks, before it
    /// reads fhir_sync_state. Returns the indexes of those that found no room (none while
    /// every first write is a claimed resource: there are as many entries as leases).
    pub fn reserve(&mut self, first_writes: &[(u64, u64)]) -> Vec<usize> {
        let mut full = Vec::new();
        let mut writes = Vec::new();
        for (i, &(resource, identity)) in first_writes.iter().enumerate() {
            if self.reserving.contains_key(&resource) {
                continue;
            }
            if !self.sharing.contains_key(&identity) {
                let w = self.identities.hold(&[(identity, 0)]);
                if w.is_empty() {
                    full.push(i);
                    continue;
                }
                writes.extend(w);
            }
            *self.sharing.entry(identity).or_default() += 1;
            self.reserving.insert(resource, identity);
        }
        apply_to(&self.slot.identities, &self.slot.identities_high, &writes);
        full
    }

    fn unreserve(&mut self, resources: &[u64]) {
        let mut writes = Vec::new();
        for r in resources {
            let Some(identity) = self.reserving.remove(r) else {
                continue;
            };
            let n = self.sharing.entry(identity).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.sharing.remove(&identity);
                writes.extend(self.identities.release(&[identity]));
            }
        }
        apply_to(&self.slot.identities, &self.slot.identities_high, &writes);
    }

    fn apply(&self, writes: &[(usize, u64)]) {
        apply_to(&self.slot.keys, &self.slot.high, writes);
        self.slot.ids.store(self.book.ids(), Ordering::Release);
    }
}

/// Writes a book's changes to its shared array: the entries first, then the mark below which
/// readers look.
fn apply_to(keys: &[AtomicU64], high: &AtomicUsize, writes: &[(usize, u64)]) {
    if writes.is_empty() {
        return;
    }
    let mut top = high.load(Ordering::Relaxed);
    for &(entry, value) in writes {
        keys[entry].store(value, Ordering::Release);
        if value != 0 {
            top = top.max(entry + 1);
        }
    }
    high.store(top, Ordering::Release);
}

/// What the other live workers of this database hold.
#[derive(Default)]
pub struct Others {
    pub keys: HashSet<u64>,
    /// Outbox rows under their leases: the candidates a claim must read past.
    pub ids: i64,
}

/// The identifier keys the first writes in flight of every other live worker of this database
/// resolve. Under the advisory locks of the identifiers asked about, and before fhir_sync_state
/// is read: a worker clears a key only after its settle committed the row's state (or its
/// reservation), which a statement started after this read sees.
pub fn identities_elsewhere() -> HashSet<u64> {
    let mut keys = HashSet::new();
    for l in live_others() {
        let high = l
            .identities_high
            .load(Ordering::Acquire)
            .min(l.identities.len());
        keys.extend(
            l.identities[..high]
                .iter()
                .map(|k| k.load(Ordering::Acquire))
                .filter(|k| *k != 0),
        );
    }
    keys
}

/// The lease slots of the other workers of this database that are alive and not stuck.
fn live_others() -> impl Iterator<Item = &'static LeaseSlot> {
    // SAFETY: reads of backend globals set at process start and at connection.
    let (me, db) = unsafe { (pg_sys::MyProcPid, pg_sys::MyDatabaseId.to_u32()) };
    let now = shmem::now_ms();
    shmem::shared()
        .into_iter()
        .flat_map(|shared| shared.workers.iter().zip(shared.leases.iter()))
        .filter(move |(w, l)| {
            let pid = w.pid.load(Ordering::Acquire);
            pid != 0
                && pid != me
                && w.db_oid.load(Ordering::Acquire) == db
                && l.until_ms.load(Ordering::Acquire) >= now
        })
        .map(|(_, l)| l)
}

/// The leases of every other live worker of this database. Under the claim lock.
pub fn held_by_others() -> Others {
    let mut others = Others::default();
    for l in live_others() {
        let high = l.high.load(Ordering::Acquire).min(l.keys.len());
        others.keys.extend(
            l.keys[..high]
                .iter()
                .map(|k| k.load(Ordering::Acquire))
                .filter(|k| *k != 0),
        );
        others.ids += l.ids.load(Ordering::Acquire) as i64;
    }
    others
}
