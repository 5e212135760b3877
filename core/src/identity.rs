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
    /// A first write: a conditional update or create, which the server resolves by identifier.
    FirstWrite,
    /// An update of the resource the row already has, by id.
    Update,
    Delete,
}

#[derive(Clone, Debug)]
pub struct Claim {
    pub row: RowRef,
    /// Its oldest pending change: of two new rows with one identifier, the older goes first.
    pub first_change: i64,
    pub identity: Identity,
    /// The id of the resource the row has on the server (fhir_sync_state), if any.
    pub fhir_id: Option<String>,
    pub plan: Plan,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// Nothing else maps to this identifier or resource: send as planned.
    Go,
    /// Another row holds the identifier (or the resource), or is first to take it: dead-letter.
    Conflict(RowRef),
    /// The row holding the identifier is letting go of it in this batch or in the one in
    /// flight (deleted, or given another identifier): look again once that has settled.
    WaitFor(RowRef),
    /// A delete of a resource another row still maps to: forget this row's claim on it, send
    /// nothing.
    KeepShared(RowRef),
}

/// Who else maps to what: per identity, the rows whose resource carries it now or who reserved
/// it for a first write (fhir_sync_state, not deleted); per resource id, the rows mapped to it.
#[derive(Clone, Debug, Default)]
pub struct Holders {
    pub by_identity: HashMap<Identity, Vec<RowRef>>,
    pub by_id: HashMap<(String, String), Vec<RowRef>>,
}

/// Decides each claim. `flying` are the claims of the batch still in flight (sent, not yet
/// settled): they count as holders of what they write, and as rows being changed.
pub fn guard(claims: &[Claim], flying: &[Claim], holders: &Holders) -> Vec<Guard> {
    let changing: HashMap<&RowRef, &Claim> =
        flying.iter().chain(claims).map(|c| (&c.row, c)).collect();
    // A row in this batch or in flight lets go of an identity unless it writes it again.
    let lets_go = |h: &RowRef, id: &Identity| {
        changing
            .get(h)
            .is_some_and(|hc| hc.plan == Plan::Delete || hc.identity != *id)
    };
    // Per identity, who takes it first among rows holding nothing: a flying write, else the
    // oldest first write of this batch whose identity nobody holds.
    let mut first_taker: HashMap<&Identity, (bool, i64, &RowRef)> = HashMap::new();
    for (flies, c) in flying
        .iter()
        .map(|c| (true, c))
        .chain(claims.iter().map(|c| (false, c)))
    {
        if c.plan == Plan::Delete {
            continue;
        }
        let held = holders
            .by_identity
            .get(&c.identity)
            .is_some_and(|hs| hs.iter().any(|h| *h != c.row));
        if held && !flies {
            continue;
        }
        let key = (!flies, c.first_change, &c.row);
        first_taker
            .entry(&c.identity)
            .and_modify(|f| {
                if (key.0, key.1) < (f.0, f.1) {
                    *f = key
                }
            })
            .or_insert(key);
    }
    claims
        .iter()
        .map(|c| {
            let others: Vec<&RowRef> = holders
                .by_identity
                .get(&c.identity)
                .into_iter()
                .flatten()
                .filter(|h| **h != c.row)
                .collect();
            let sharing: Vec<&RowRef> = c
                .fhir_id
                .as_ref()
                .and_then(|id| {
                    holders
                        .by_id
                        .get(&(c.identity.resource_type.clone(), id.clone()))
                })
                .into_iter()
                .flatten()
                .filter(|h| **h != c.row)
                .collect();
            match c.plan {
                Plan::Delete => {
                    // Rows mapped to the same resource (by id, or by the identifier a
                    // conditional delete would search) that are not deleted along with it.
                    let mut mapped: Vec<&RowRef> = sharing.clone();
                    if c.fhir_id.is_none() {
                        mapped.extend(others.iter().copied());
                    }
                    let staying = mapped
                        .iter()
                        .find(|h| !changing.get(**h).is_some_and(|hc| hc.plan == Plan::Delete));
                    let first_going = mapped
                        .iter()
                        .filter_map(|h| changing.get(*h))
                        .all(|hc| c.first_change < hc.first_change);
                    match staying {
                        Some(h) => Guard::KeepShared((*h).clone()),
                        None if first_going => Guard::Go,
                        None => Guard::KeepShared(mapped[0].clone()),
                    }
                }
                Plan::Update => {
                    // By id: the server does not search, so a holder letting go of the
                    // identifier in the same batch (two MRNs swapped) is no danger.
                    if let Some(h) = sharing.first() {
                        return Guard::Conflict((*h).clone());
                    }
                    match others.iter().find(|h| !lets_go(h, &c.identity)) {
                        Some(h) => Guard::Conflict((*h).clone()),
                        None => Guard::Go,
                    }
                }
                Plan::FirstWrite => {
                    if let Some(h) = others.iter().find(|h| !lets_go(h, &c.identity)) {
                        return Guard::Conflict((*h).clone());
                    }
                    if let Some(h) = others.first() {
                        // The server still finds the holder's resource by this identifier
                        // until the holder's change is delivered.
                        return Guard::WaitFor((*h).clone());
                    }
                    match first_taker.get(&c.identity) {
                        Some((_, _, f)) if **f != c.row => Guard::Conflict((*f).clone()),
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
            fhir_id: (plan != Plan::FirstWrite).then(|| format!("r{k}")),
            plan,
        }
    }
    fn held(pairs: &[(&str, &[&str])]) -> Holders {
        Holders {
            by_identity: pairs
                .iter()
                .map(|(v, rows)| (id(v), rows.iter().map(|k| row(k)).collect()))
                .collect(),
            by_id: HashMap::new(),
        }
    }

    #[test]
    fn each_case_of_a_shared_identifier() {
        use Guard::*;
        use Plan::*;
        type Case = (&'static str, Vec<Claim>, Vec<Claim>, Holders, Vec<Guard>);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("a new row with a free identifier goes",
             vec![claim("1", 1, "X", FirstWrite)], vec![], held(&[]), vec![Go]),
            ("the row that holds the identifier updates it",
             vec![claim("1", 5, "X", Update)], vec![], held(&[("X", &["1"])]), vec![Go]),
            ("a second row with a held identifier is a conflict",
             vec![claim("2", 5, "X", FirstWrite)], vec![], held(&[("X", &["1"])]), vec![Conflict(row("1"))]),
            ("two new rows in one batch: the older goes, the younger conflicts",
             vec![claim("2", 9, "X", FirstWrite), claim("1", 3, "X", FirstWrite)], vec![], held(&[]),
             vec![Conflict(row("1")), Go]),
            ("the holder updates in the same batch as an older duplicate: the holder wins",
             vec![claim("1", 101, "X", Update), claim("2", 100, "X", FirstWrite)], vec![], held(&[("X", &["1"])]),
             vec![Go, Conflict(row("1"))]),
            ("the holder moves to another identifier in this batch: wait for it",
             vec![claim("1", 2, "Y", Update), claim("2", 5, "X", FirstWrite)], vec![], held(&[("X", &["1"])]),
             vec![Go, WaitFor(row("1"))]),
            ("the holder is deleted in this batch: wait, then create",
             vec![claim("1", 2, "X", Delete), claim("2", 5, "X", FirstWrite)], vec![], held(&[("X", &["1"])]),
             vec![Go, WaitFor(row("1"))]),
            ("two rows swap their MRNs: both are updates by id and go",
             vec![claim("1", 2, "Y", Update), claim("2", 3, "X", Update)], vec![],
             held(&[("X", &["1"]), ("Y", &["2"])]), vec![Go, Go]),
            ("a row's update takes an MRN another row keeps: conflict",
             vec![claim("2", 3, "X", Update)], vec![], held(&[("X", &["1"]), ("Y", &["2"])]),
             vec![Conflict(row("1"))]),
            ("a first write of the same identifier is in flight: conflict",
             vec![claim("2", 9, "X", FirstWrite)], vec![claim("1", 3, "X", FirstWrite)], held(&[]),
             vec![Conflict(row("1"))]),
            ("the holder's move away is in flight: wait",
             vec![claim("2", 9, "X", FirstWrite)], vec![claim("1", 3, "Y", Update)], held(&[("X", &["1"])]),
             vec![WaitFor(row("1"))]),
            ("a delete by id of the row's own resource goes, whoever else carries the identifier",
             vec![claim("1", 2, "X", Delete)], vec![], held(&[("X", &["1", "2"])]),
             vec![Go]),
            ("a conditional delete (no id known) of an identifier another row holds sends nothing",
             vec![Claim { fhir_id: None, ..claim("1", 2, "X", Delete) }], vec![], held(&[("X", &["2"])]),
             vec![KeepShared(row("2"))]),
            ("every row of a shared resource deleted in one batch: the oldest change deletes it",
             vec![claim("2", 7, "X", Delete), claim("1", 4, "X", Delete)], vec![],
             Holders { by_identity: HashMap::new(), by_id: HashMap::from([(("Patient".into(), "r1".into()), vec![row("1"), row("2")]), (("Patient".into(), "r2".into()), vec![row("1"), row("2")])]) },
             vec![KeepShared(row("1")), Go]),
            ("the last row of a resource deletes it",
             vec![claim("1", 2, "X", Delete)], vec![], held(&[("X", &["1"])]), vec![Go]),
            ("other identifiers are left alone",
             vec![claim("2", 2, "Y", FirstWrite)], vec![], held(&[("X", &["3"])]), vec![Go]),
        ];
        for (what, claims, flying, holders, want) in cases {
            assert_eq!(guard(&claims, &flying, &holders), want, "{what}");
        }
    }

    #[test]
    fn rows_sharing_one_resource_id_neither_update_nor_delete_it_for_the_other() {
        // The state an earlier release left after a duplicate MRN, the identifiers since diverged.
        let mut a = claim("1", 1, "X", Plan::Update);
        let mut b = claim("2", 2, "Y", Plan::Delete);
        a.fhir_id = Some("R".into());
        b.fhir_id = Some("R".into());
        let holders = Holders {
            by_identity: HashMap::new(),
            by_id: HashMap::from([(("Patient".into(), "R".into()), vec![row("1"), row("2")])]),
        };
        assert_eq!(
            guard(&[a.clone()], &[], &holders),
            vec![Guard::Conflict(row("2"))]
        );
        assert_eq!(
            guard(&[b], &[], &holders),
            vec![Guard::KeepShared(row("1"))]
        );
    }

    #[test]
    fn another_resource_type_or_system_is_another_identity() {
        let mut other_type = id("X");
        other_type.resource_type = "Practitioner".into();
        let mut other_system = id("X");
        other_system.system = "urn:other".into();
        let holders = Holders {
            by_identity: HashMap::from([
                (other_type, vec![row("1")]),
                (other_system, vec![row("1")]),
            ]),
            by_id: HashMap::new(),
        };
        assert_eq!(
            guard(&[claim("2", 1, "X", Plan::FirstWrite)], &[], &holders),
            vec![Guard::Go]
        );
    }
}
