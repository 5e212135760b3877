//! One source row, one resource: the guard that keeps two tracked rows with the same
//! identifier (a duplicate MRN) from sharing — and overwriting, and deleting — one FHIR
//! resource. A pure decision over the batch's planned requests and the rows that already hold
//! each identifier on the server (fhir_sync_state); the worker applies it in its map step.

use std::collections::HashMap;

/// A tracked source row: its table (oid) and key.
pub type RowRef = (u32, String);

/// The identifier a resource is addressed by, within its resource type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub resource_type: String,
    pub system: String,
    pub value: String,
}

/// What the map step planned for a claimed resource whose identifier could collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Put,
    Delete,
    /// No request (a wait, a mapping failure): holds nothing back but claims nothing either.
    Other,
}

#[derive(Clone, Debug)]
pub struct Claim {
    pub row: RowRef,
    /// Its oldest pending change: of two new rows with one identifier, the older goes first.
    pub first_change: i64,
    pub identity: Identity,
    pub plan: Plan,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// Nothing else maps to this identifier: send as planned.
    Go,
    /// Another row holds (or, in this batch, is first to take) the identifier: dead-letter.
    Conflict(RowRef),
    /// The row holding the identifier is being changed in this batch (deleted, or given
    /// another identifier): look again once that has settled.
    WaitFor(RowRef),
    /// A delete of a resource another row still maps to: forget this row's claim on it, send
    /// nothing.
    KeepShared(RowRef),
}

/// Decides each claim. `holders` lists, per identity, the rows whose synced resource carries
/// it now (fhir_sync_state, not deleted).
pub fn guard(claims: &[Claim], holders: &HashMap<Identity, Vec<RowRef>>) -> Vec<Guard> {
    let in_batch: HashMap<&RowRef, &Claim> = claims.iter().map(|c| (&c.row, c)).collect();
    // Per identity, the oldest claim in the batch that puts it.
    let mut first_put: HashMap<&Identity, &Claim> = HashMap::new();
    for c in claims.iter().filter(|c| c.plan == Plan::Put) {
        first_put
            .entry(&c.identity)
            .and_modify(|f| {
                if c.first_change < f.first_change {
                    *f = c
                }
            })
            .or_insert(c);
    }
    claims
        .iter()
        .map(|c| {
            let others: Vec<&RowRef> = holders
                .get(&c.identity)
                .into_iter()
                .flatten()
                .filter(|h| **h != c.row)
                .collect();
            match c.plan {
                Plan::Other => Guard::Go,
                Plan::Delete => {
                    // Others that are being deleted in this batch as well do not keep the
                    // resource: of all its rows going, the oldest change sends the DELETE.
                    let staying = others.iter().find(|h| {
                        !in_batch.get(**h).is_some_and(|hc| {
                            hc.plan == Plan::Delete && hc.identity == c.identity
                        })
                    });
                    let first_going = others
                        .iter()
                        .filter_map(|h| in_batch.get(*h))
                        .all(|hc| c.first_change < hc.first_change);
                    match staying {
                        Some(h) => Guard::KeepShared((*h).clone()),
                        None if first_going => Guard::Go,
                        None => Guard::KeepShared(others[0].clone()),
                    }
                }
                Plan::Put => {
                    if let Some(h) = others.first() {
                        // Still holding it after this batch? Only if it is not changing, or
                        // its change puts the same identifier again.
                        return match in_batch.get(h) {
                            Some(hc) if !(hc.plan == Plan::Put && hc.identity == c.identity) => {
                                Guard::WaitFor((*h).clone())
                            }
                            _ => Guard::Conflict((*h).clone()),
                        };
                    }
                    match first_put.get(&c.identity) {
                        Some(f) if f.row != c.row => Guard::Conflict(f.row.clone()),
                        _ => Guard::Go,
                    }
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(v: &str) -> Identity {
        Identity {
            resource_type: "Patient".into(),
            system: "urn:mrn".into(),
            value: v.into(),
        }
    }
    fn row(k: &str) -> RowRef {
        (100, k.into())
    }
    fn claim(k: &str, first: i64, v: &str, plan: Plan) -> Claim {
        Claim {
            row: row(k),
            first_change: first,
            identity: id(v),
            plan,
        }
    }

    #[test]
    fn each_case_of_a_shared_identifier() {
        use Guard::*;
        use Plan::*;
        let held = |pairs: &[(&str, &[&str])]| -> HashMap<Identity, Vec<RowRef>> {
            pairs
                .iter()
                .map(|(v, rows)| (id(v), rows.iter().map(|k| row(k)).collect()))
                .collect()
        };
        type Case = (
            &'static str,
            Vec<Claim>,
            HashMap<Identity, Vec<RowRef>>,
            Vec<Guard>,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("a new row with a free identifier goes",
             vec![claim("1", 1, "X", Put)], held(&[]), vec![Go]),
            ("the row that holds the identifier updates it",
             vec![claim("1", 5, "X", Put)], held(&[("X", &["1"])]), vec![Go]),
            ("a second row with a held identifier is a conflict",
             vec![claim("2", 5, "X", Put)], held(&[("X", &["1"])]), vec![Conflict(row("1"))]),
            ("two new rows in one batch: the older goes, the younger conflicts",
             vec![claim("2", 9, "X", Put), claim("1", 3, "X", Put)], held(&[]),
             vec![Conflict(row("1")), Go]),
            ("the holder updates in the same batch with the same identifier: still a conflict",
             vec![claim("1", 2, "X", Put), claim("2", 5, "X", Put)], held(&[("X", &["1"])]),
             vec![Go, Conflict(row("1"))]),
            ("the holder moves to another identifier in this batch: wait for it",
             vec![claim("1", 2, "Y", Put), claim("2", 5, "X", Put)], held(&[("X", &["1"])]),
             vec![Go, WaitFor(row("1"))]),
            ("the holder is deleted in this batch: wait, then create",
             vec![claim("1", 2, "X", Delete), claim("2", 5, "X", Put)], held(&[("X", &["1"])]),
             vec![Go, WaitFor(row("1"))]),
            ("a delete of a resource another row maps to sends nothing",
             vec![claim("1", 2, "X", Delete)], held(&[("X", &["1", "2"])]),
             vec![KeepShared(row("2"))]),
            ("every row of a shared resource deleted in one batch: the oldest change deletes it",
             vec![claim("2", 7, "X", Delete), claim("1", 4, "X", Delete)], held(&[("X", &["1", "2"])]),
             vec![KeepShared(row("1")), Go]),
            ("the last row of a resource deletes it",
             vec![claim("1", 2, "X", Delete)], held(&[("X", &["1"])]), vec![Go]),
            ("other identifiers and unplanned rows are left alone",
             vec![claim("1", 1, "X", Other), claim("2", 2, "Y", Put)], held(&[("X", &["3"])]),
             vec![Go, Go]),
        ];
        for (what, claims, holders, want) in cases {
            assert_eq!(guard(&claims, &holders), want, "{what}");
        }
    }

    #[test]
    fn another_resource_type_or_system_is_another_identity() {
        let mut other_type = id("X");
        other_type.resource_type = "Practitioner".into();
        let mut other_system = id("X");
        other_system.system = "urn:other".into();
        let holders = HashMap::from([(other_type, vec![row("1")]), (other_system, vec![row("1")])]);
        assert_eq!(
            guard(&[claim("2", 1, "X", Plan::Put)], &holders),
            vec![Guard::Go]
        );
    }
}
