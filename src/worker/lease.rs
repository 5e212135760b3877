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
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// The key of a claimed resource.
pub fn key_of(table: pg_sys::Oid, resource_key: &str) -> u64 {
    lease::key(table.to_u32(), resource_key)
}

fn key_of_claimed(c: &Claimed) -> u64 {
    key_of(c.resource_table, &c.resource_key)
}

/// This worker's leases.
pub struct Leases {
    slot: &'static LeaseSlot,
    book: Book,
}

impl Leases {
    /// The slot's leases, all ended (a worker that had the slot before may have left some).
    pub fn new(slot: &'static LeaseSlot) -> Self {
        for k in &slot.keys {
            k.store(0, Ordering::Relaxed);
        }
        slot.ids.store(0, Ordering::Relaxed);
        slot.high.store(0, Ordering::Release);
        Leases {
            slot,
            book: Book::default(),
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

    /// Ends the leases of `claimed`: only once what was settled of them has committed.
    pub fn release(&mut self, claimed: &[Claimed]) {
        let keys: Vec<u64> = claimed.iter().map(key_of_claimed).collect();
        let writes = self.book.release(&keys);
        self.apply(&writes);
    }

    /// Ends every lease (a failed cycle: nothing of it is in flight any more).
    pub fn clear(&mut self) {
        let writes = self.book.clear();
        self.apply(&writes);
    }

    fn apply(&self, writes: &[(usize, u64)]) {
        let mut high = self.slot.high.load(Ordering::Relaxed);
        for &(entry, value) in writes {
            self.slot.keys[entry].store(value, Ordering::Release);
            if value != 0 {
                high = high.max(entry + 1);
            }
        }
        self.slot.ids.store(self.book.ids(), Ordering::Release);
        self.slot.high.store(high, Ordering::Release);
    }
}

/// What the other live workers of this database hold.
#[derive(Default)]
pub struct Others {
    pub keys: HashSet<u64>,
    /// Outbox rows under their leases: the candidates a claim must read past.
    pub ids: i64,
}

/// The leases of every other live worker of this database. Under the claim lock.
pub fn held_by_others() -> Others {
    let Some(shared) = shmem::shared() else {
        return Others::default();
    };
    // SAFETY: reads of backend globals set at process start and at connection.
    let (me, db) = unsafe { (pg_sys::MyProcPid, pg_sys::MyDatabaseId.to_u32()) };
    let now = shmem::now_ms();
    let mut others = Others::default();
    for (w, l) in shared.workers.iter().zip(shared.leases.iter()) {
        let pid = w.pid.load(Ordering::Acquire);
        if pid == 0
            || pid == me
            || w.db_oid.load(Ordering::Acquire) != db
            || l.until_ms.load(Ordering::Acquire) < now
        {
            continue;
        }
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
