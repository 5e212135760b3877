//! Leases: which resources a worker has claimed and not yet settled (pure bookkeeping; the
//! extension publishes the slots in shared memory).
//!
//! A lease was two columns of the outbox row, written at every claim: a full new version of each
//! claimed row in the WAL and the heap, for a fact that lives as long as one request and that no
//! crash needs (after a crash every worker is new, and every lease void). It now lives in a
//! fixed array of 64-bit keys per worker in shared memory, written by that worker only while it
//! holds its database's claim lock, read by the other workers of the database under the same
//! lock. A key stands for a resource (its table and key, hashed): two resources with one key
//! only make one of them wait for the other's settle.

use std::collections::HashMap;

/// Leases one worker can hold at once: a claimed batch and the one claimed ahead of it
/// (fhir_sync.batch_size is capped at half of this).
pub const PER_WORKER: usize = 8192;

/// The key of a resource: FNV-1a over its table's oid and its key; never 0 (an empty entry).
pub fn key(table: u32, resource_key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in table
        .to_le_bytes()
        .iter()
        .chain(std::iter::once(&0xff))
        .chain(resource_key.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// A worker's own view of its slot: where each of its keys sits and which entries are free.
/// Its methods return the writes to make to the shared array: (entry, value), 0 freeing it.
#[derive(Debug)]
pub struct Book {
    at: HashMap<u64, (usize, u64)>,
    free: Vec<usize>,
    ids: u64,
}

impl Default for Book {
    fn default() -> Self {
        Book {
            at: HashMap::new(),
            free: (0..PER_WORKER).rev().collect(),
            ids: 0,
        }
    }
}

impl Book {
    /// How many more resources fit.
    pub fn room(&self) -> usize {
        self.free.len()
    }

    /// Whether `key` is leased here.
    pub fn holds(&self, key: u64) -> bool {
        self.at.contains_key(&key)
    }

    /// Outbox rows under lease (the other workers' claims read that many more candidates).
    pub fn ids(&self) -> u64 {
        self.ids
    }

    /// Leases `keys`, each with the number of outbox rows it covers. A key already held (a
    /// resource claimed again after a failed cycle) keeps its entry; none is taken past room().
    pub fn hold(&mut self, keys: &[(u64, u64)]) -> Vec<(usize, u64)> {
        let mut writes = Vec::new();
        for &(k, rows) in keys {
            if let Some((_, n)) = self.at.get_mut(&k) {
                self.ids = self.ids - *n + rows;
                *n = rows;
                continue;
            }
            let Some(entry) = self.free.pop() else { break };
            self.at.insert(k, (entry, rows));
            self.ids += rows;
            writes.push((entry, k));
        }
        writes
    }

    /// Ends the leases of `keys` (those not held are ignored).
    pub fn release(&mut self, keys: &[u64]) -> Vec<(usize, u64)> {
        let mut writes = Vec::new();
        for k in keys {
            if let Some((entry, rows)) = self.at.remove(k) {
                self.ids -= rows;
                self.free.push(entry);
                writes.push((entry, 0));
            }
        }
        writes
    }

    /// Ends every lease.
    pub fn clear(&mut self) -> Vec<(usize, u64)> {
        let keys: Vec<u64> = self.at.keys().copied().collect();
        self.release(&keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_tables_and_keys_apart_and_are_never_empty() {
        let cases = [
            ((16384, "1"), (16384, "2")),
            ((16384, "1"), (16385, "1")),
            ((16384, "12"), (16385, "2")), // the table's bytes and the key's cannot run together
            ((1, ""), (1, "\u{0}")),
        ];
        for (a, b) in cases {
            assert_ne!(key(a.0, a.1), key(b.0, b.1), "{a:?} vs {b:?}");
            assert_ne!(key(a.0, a.1), 0);
        }
        assert_eq!(
            key(16384, "7"),
            key(16384, "7"),
            "the same in every process"
        );
    }

    #[test]
    fn a_book_hands_out_entries_once_and_takes_them_back() {
        let mut b = Book::default();
        let w = b.hold(&[(10, 1), (20, 3)]);
        assert_eq!(w.len(), 2);
        assert_ne!(w[0].0, w[1].0, "two resources, two entries");
        assert_eq!(b.ids(), 4);
        assert_eq!(b.room(), PER_WORKER - 2);
        // Held again (after a failed cycle): same entry, nothing written, rows counted once.
        assert!(b.hold(&[(20, 5)]).is_empty());
        assert_eq!(b.ids(), 6);
        let r = b.release(&[20, 99]);
        assert_eq!(r, vec![(w[1].0, 0)], "only what was held is freed");
        assert_eq!(b.ids(), 1);
        // The freed entry is reused.
        assert_eq!(b.hold(&[(30, 1)]), vec![(w[1].0, 30)]);
        let mut c = b.clear();
        c.sort();
        let mut expect = vec![(w[0].0, 0), (w[1].0, 0)];
        expect.sort();
        assert_eq!(c, expect);
        assert_eq!((b.ids(), b.room()), (0, PER_WORKER));
    }

    #[test]
    fn a_full_book_takes_no_more() {
        let mut b = Book::default();
        let keys: Vec<(u64, u64)> = (1..=PER_WORKER as u64 + 5).map(|k| (k, 1)).collect();
        assert_eq!(b.hold(&keys).len(), PER_WORKER);
        assert_eq!(b.room(), 0);
        assert!(b.hold(&[(u64::MAX, 1)]).is_empty());
    }
}
