//! Map: what to send for each claimed resource, from its source rows as they stand now.
//!
//! A resource whose row is gone is deleted; one whose row exists is PUT whole (a child-table
//! change therefore never sends a partial Patient). References point at `Patient/<id>` as
//! recorded when the Patient synced; a resource whose Patient is not on the server yet waits.
//! Also used by `fhir_preview`, which plans without sending or enqueueing anything.

use super::claim::Claimed;
use super::policy::Class;
use crate::error::FhirSyncError;
use crate::http::{identifier_query, weak_etag};
use crate::mapping::{self, Ctx, Refs, Row};
use crate::source::{self, Mapper, Synced, Track};
use fhir_sync_core::capability::{self, Capabilities};
use fhir_sync_core::identity;
use fhir_sync_core::send::{Create, WriteMode};
use pgrx::pg_sys;
use serde_json::{json, Value};
use std::collections::HashMap;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Deliver,
    Preview,
}

#[derive(Clone, Debug)]
pub enum Action {
    /// PUT to `path`: conditional on the identifier until the server has given the resource an
    /// id, by id after that, with `If-Match` on the version last written when it is known.
    Put {
        path: String,
        body: Box<Value>,
        identifier: (String, String),
        if_match: Option<String>,
        /// A first write as a conditional create (`POST` to `path`, the resource type).
        create: Option<Box<Create>>,
    },
    Delete {
        path: String,
        /// The identifier a conditional delete searches (None when by id): what the identity
        /// guard checks.
        identifier: Option<(String, String)>,
    },
    /// The row is gone and nothing of it is on the server: settled without a request.
    AlreadyGone,
    /// A referenced resource is not on the server yet.
    Wait(String),
    Fail(Class, String),
}

impl Action {
    /// A write the server resolves by identifier (a conditional update or create): the
    /// resource's first, or a first again after a delete.
    pub fn is_first_write(&self) -> bool {
        match self {
            Action::Put { create, path, .. } => create.is_some() || path.contains('?'),
            _ => false,
        }
    }
}

/// What becomes of a resource whose rows could not be read or mapped: a table locked past
/// fhir_sync.lock_timeout holds its changes back for a while (nothing is wrong with them); any
/// other error dead-letters the change with the reason: the row named and its SQLSTATE, and,
/// when delivering, PostgreSQL's message (kept in fhir_dlq only, never logged; a preview, an
/// error raised to its caller, does not echo it: it may quote the row's values).
fn not_read(e: &FhirSyncError, mode: Mode) -> Action {
    if let FhirSyncError::Deferred(why) = e {
        return Action::Wait(why.clone());
    }
    match e.pg() {
        Some(p) if p.is_lock_timeout() => {
            Action::Wait("its table is locked (lock_timeout); retried".into())
        }
        Some(p) if mode == Mode::Deliver => {
            Action::Fail(Class::Unmappable, format!("{e}: {}", p.message))
        }
        _ => Action::Fail(Class::Unmappable, e.to_string()),
    }
}

/// Plans every claimed resource. In Deliver mode, `deps` collects the (table, key) of
/// referenced resources that must be enqueued because nothing pending will sync them.
///
/// `caps` is what the server's CapabilityStatement says (None: unknown, or a preview): it can
/// change a table's write mode, drop If-Match, or refuse a delete the server does not take.
///
/// `flying` are the identities of the batch still in flight; the identities this plan sends are
/// added to `sending` (the caller keeps them while the batch is in flight).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    schema: &str,
    tracks: &HashMap<pg_sys::Oid, Track>,
    claimed: &[Claimed],
    mode: Mode,
    caps: Option<&Capabilities>,
    flying: &[identity::Claim],
    sending: &mut Vec<identity::Claim>,
    deps: &mut Vec<(pg_sys::Oid, String)>,
) -> Result<Vec<Action>, FhirSyncError> {
    let base = crate::gucs::identifier_system();
    let mut actions: Vec<Option<Action>> = vec![None; claimed.len()];
    // Resources whose identifier comes from the row's data (and so may be shared by another
    // row), with what is planned for them: checked together once every table is planned.
    let mut identities: Vec<(usize, identity::Claim)> = Vec::new();
    // Which claimed resources have a fhir_sync_state row (a first write of one that has none
    // reserves it with a plain insert).
    let mut recorded = vec![false; claimed.len()];
    let mut by_table: HashMap<pg_sys::Oid, Vec<usize>> = HashMap::new();
    for (i, c) in claimed.iter().enumerate() {
        by_table.entry(c.resource_table).or_default().push(i);
    }
    for (table, idx) in by_table {
        let Some(track) = tracks.get(&table) else {
            for i in idx {
                actions[i] = Some(Action::Fail(
                    Class::Unmappable,
                    "the table of this change is no longer tracked".into(),
                ));
            }
            continue;
        };
        let keys: Vec<String> = idx
            .iter()
            .map(|i| claimed[*i].resource_key.clone())
            .collect();
        // A preview shows no version (and its caller may not read the version cache).
        let states = source::sync_states(schema, table, &keys, mode == Mode::Deliver)?;
        // Once per table, not per row: the same for each of its resources.
        let how = write_plan(track, caps);
        let mut rows: HashMap<String, Row> = HashMap::new();
        let mut unreadable = source::Unreadable::new();
        let mut custom: HashMap<String, Result<Value, FhirSyncError>> = HashMap::new();
        if track.mapper == Mapper::Function {
            let now = source::current_map_function(schema, track)?;
            let f = now.map_function.unwrap_or(pg_sys::InvalidOid);
            custom = source::run_map_function(&now, f, &keys);
            if track.identifier_column.is_some() {
                (rows, unreadable) = source::fetch_rows_isolated(track, &keys);
            }
        } else {
            (rows, unreadable) = source::fetch_rows_isolated(track, &keys);
        }
        let children = if track.mapper == Mapper::Patient {
            let mut all: HashMap<String, Vec<Row>> = HashMap::new();
            for child in tracks.values().filter(|t| {
                t.mapper == Mapper::PatientIdentifier
                    && t.parent.as_ref().map(|p| p.0) == Some(table)
            }) {
                let (found, failed) = source::fetch_children(child, &keys);
                for (k, mut v) in found {
                    all.entry(k).or_default().append(&mut v);
                }
                // A parent whose identifier rows cannot be read is not sent without them.
                for (k, e) in failed {
                    unreadable.entry(k).or_insert(e);
                }
            }
            all
        } else {
            HashMap::new()
        };
        let refs = References::load(schema, tracks, track, &rows)?;

        for i in idx {
            let c = &claimed[i];
            recorded[i] = states.contains_key(&c.resource_key);
            let state = states.get(&c.resource_key).cloned().unwrap_or_default();
            let exists = if track.mapper == Mapper::Function {
                custom.contains_key(&c.resource_key)
            } else {
                rows.contains_key(&c.resource_key)
            };
            let action = if let Some(e) = unreadable.get(&c.resource_key) {
                not_read(e, mode)
            } else if let Some(Err(e)) = custom.get(&c.resource_key) {
                not_read(e, mode)
            } else if !exists {
                plan_delete(track, c, &state, &base, &how)
            } else {
                let ctx = Ctx {
                    table: &track.name,
                    key: &c.resource_key,
                    identifier_base: &base,
                };
                let unmappable = |e: String| Action::Fail(Class::Unmappable, e);
                let mapped: Result<Value, Action> = match track.mapper {
                    Mapper::Patient => {
                        let row = &rows[&c.resource_key];
                        let none = Vec::new();
                        mapping::patient::map(
                            row,
                            children.get(&c.resource_key).unwrap_or(&none),
                            &ctx,
                        )
                        .map_err(|e| unmappable(e.to_string()))
                    }
                    Mapper::Encounter | Mapper::BloodPressure | Mapper::Pulse => {
                        let row = &rows[&c.resource_key];
                        // A reference that cannot be made yet is an Action (wait, or fail)
                        // of its own, not a mapping error.
                        refs.resolve(row, track, c, mode, deps).and_then(|r| {
                            match track.mapper {
                                Mapper::Encounter => mapping::encounter::map(row, &ctx, &r),
                                Mapper::BloodPressure => {
                                    mapping::observation::blood_pressure(row, &ctx, &r)
                                }
                                _ => mapping::observation::pulse(row, &ctx, &r),
                            }
                            .map_err(|e| unmappable(e.to_string()))
                        })
                    }
                    Mapper::Function => match &custom[&c.resource_key] {
                        Err(e) => Err(not_read(e, mode)),
                        Ok(v) => {
                            let id = identifier_for(
                                track,
                                rows.get(&c.resource_key),
                                &c.resource_key,
                                &base,
                            );
                            mapping::custom::finish(
                                v.clone(),
                                &track.resource_type,
                                json!({"system": id.0, "value": id.1}),
                                &ctx,
                            )
                            .map_err(|e| unmappable(e.to_string()))
                        }
                    },
                    Mapper::PatientIdentifier => Err(unmappable(
                        "identifier rows are delivered with their patient".to_string(),
                    )),
                };
                match mapped {
                    Ok(body) => plan_put(
                        track,
                        body,
                        rows.get(&c.resource_key),
                        c,
                        &state,
                        (&base, &how),
                    ),
                    Err(action) => action,
                }
            };
            if identifier_from_data(track) {
                let planned = match &action {
                    Action::Put { identifier, .. } if action.is_first_write() => {
                        Some((identifier.clone(), identity::Plan::FirstWrite))
                    }
                    Action::Put { identifier, .. } => {
                        Some((identifier.clone(), identity::Plan::Update))
                    }
                    Action::Delete {
                        identifier: Some(id),
                        ..
                    } => Some((id.clone(), identity::Plan::Delete)),
                    _ => None,
                };
                if let Some(((system, value), plan)) = planned {
                    identities.push((
                        i,
                        identity::Claim {
                            row: (c.resource_table.to_u32(), c.resource_key.clone()),
                            first_change: c.outbox_ids.iter().copied().min().unwrap_or(i64::MAX),
                            identity: identity::Identity {
                                resource_type: track.resource_type.clone(),
                                system,
                                value,
                            },
                            fhir_id: state.fhir_id.clone().filter(|_| !state.deleted),
                            plan,
                        },
                    ));
                }
            }
            actions[i] = Some(action);
        }
    }
    guard_identities(
        schema,
        tracks,
        (claimed, &recorded, mode),
        (&identities, flying, sending),
        &mut actions,
    )?;
    Ok(actions
        .into_iter()
        .map(|a| a.unwrap_or(Action::Fail(Class::Unmappable, "not planned".into())))
        .collect())
}

/// Whether a track's identifier comes from its rows' data (an MRN), so that two rows may carry
/// the same one. A derived identifier (table and key) is unique by construction.
fn identifier_from_data(track: &Track) -> bool {
    match track.mapper {
        Mapper::Patient => true,
        Mapper::Function => track.identifier_column.is_some(),
        _ => false,
    }
}

/// One source row, one resource (`fhir_sync_core::identity`): a write whose identifier (or
/// resource) another row already maps to is dead-lettered instead of overwriting that row's
/// resource, or waits when that row is letting go of it; a DELETE of a resource another row
/// still maps to sends nothing. Rows are named by table and key, never by the identifier.
///
/// When delivering, a first write reserves its identifier in fhir_sync_state before it is sent
/// (so that a row whose write is retrying, or was dead-lettered after the server may have
/// applied it, still holds it), under a transaction-level advisory lock per identifier, so that
/// two workers cannot both find it free.
fn guard_identities(
    schema: &str,
    tracks: &HashMap<pg_sys::Oid, Track>,
    (claimed, recorded, mode): (&[Claimed], &[bool], Mode),
    (identities, flying, sending): (
        &[(usize, identity::Claim)],
        &[identity::Claim],
        &mut Vec<identity::Claim>,
    ),
    actions: &mut [Option<Action>],
) -> Result<(), FhirSyncError> {
    if identities.is_empty() {
        return Ok(());
    }
    let first_writes: Vec<&identity::Identity> = identities
        .iter()
        .filter(|(_, c)| c.plan == identity::Plan::FirstWrite)
        .map(|(_, c)| &c.identity)
        .collect();
    let busy = if mode == Mode::Deliver && !first_writes.is_empty() {
        source::lock_identities(&first_writes)?
    } else {
        Vec::new()
    };
    // A first write whose identifier another worker is checking now waits for the next cycle.
    let (waiting, identities): (Vec<_>, Vec<_>) = identities
        .iter()
        .partition(|(_, c)| c.plan == identity::Plan::FirstWrite && busy.contains(&c.identity));
    for (i, _) in waiting {
        actions[*i] = Some(Action::Wait(
            "another worker is checking its identifier".into(),
        ));
    }
    let wanted: Vec<&identity::Identity> = identities.iter().map(|(_, c)| &c.identity).collect();
    let ids: Vec<(String, String)> = identities
        .iter()
        .filter_map(|(_, c)| Some((c.identity.resource_type.clone(), c.fhir_id.clone()?)))
        .collect();
    let (holders, mut names) = source::identifier_holders(schema, &wanted, &ids)?;
    for t in tracks.values() {
        names.insert(t.relid.to_u32(), t.name.clone());
    }
    let claims: Vec<identity::Claim> = identities.iter().map(|(_, c)| c.clone()).collect();
    let name = |r: &identity::RowRef| source::row_name(&names, r);
    let mut reserve = Vec::new();
    for ((i, claim), verdict) in identities
        .iter()
        .zip(identity::guard(&claims, flying, &holders))
    {
        let me = name(&claim.row);
        let kind = &claim.identity.resource_type;
        let replaced = match verdict {
            identity::Guard::Go => {
                sending.push(claim.clone());
                if claim.plan == identity::Plan::FirstWrite {
                    reserve.push((claim, recorded[*i]));
                }
                continue;
            }
            identity::Guard::Conflict(other) => Action::Fail(
                Class::IdentifierConflict,
                format!(
                    "{me}: its identifier (or its resource) already belongs to the {kind} of {}; not sent, so that that row's resource is not overwritten. Change or delete one of the two rows, then requeue",
                    name(&other)
                ),
            ),
            identity::Guard::WaitFor(other) => Action::Wait(format!(
                "its identifier is being released by {}",
                name(&other)
            )),
            identity::Guard::KeepShared(_) => Action::AlreadyGone,
        };
        debug_assert!(claimed[*i].resource_key == claim.row.1);
        actions[*i] = Some(replaced);
    }
    if mode == Mode::Deliver && !reserve.is_empty() {
        source::reserve_identities(schema, &reserve)?;
    }
    Ok(())
}

fn text_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The identifier a resource is addressed by: the patient's own, a configured column, or one
/// derived from table and key.
fn identifier_for(track: &Track, row: Option<&Row>, key: &str, base: &str) -> (String, String) {
    match track.mapper {
        Mapper::Patient => {
            if let Some(row) = row {
                if let (Some(s), Some(v)) = (
                    text_of(row.get("identifier_system")),
                    text_of(row.get("identifier_value")),
                ) {
                    return (s, v);
                }
            }
        }
        Mapper::Function => {
            if let (Some(col), Some(row)) = (&track.identifier_column, row) {
                if let Some(v) = text_of(row.get(col)) {
                    let system = track
                        .identifier_system
                        .clone()
                        .unwrap_or_else(|| mapping::derived_system(base, &track.name));
                    return (system, v);
                }
            }
        }
        _ => {}
    }
    (mapping::derived_system(base, &track.name), key.to_string())
}

/// How a table's resources are written: its write mode (or fhir_sync.write_mode), as the
/// server's CapabilityStatement allows.
fn write_plan(track: &Track, caps: Option<&Capabilities>) -> capability::Plan {
    let configured = track.write_mode.unwrap_or_else(crate::gucs::write_mode);
    match caps {
        // A write mode given for the table is the DBA's word about this server: the statement
        // still drops If-Match or a delete it does not take, but does not change the mode.
        Some(c) if track.write_mode.is_some() => capability::Plan {
            write_mode: configured,
            ..c.plan(&track.resource_type, configured)
        },
        Some(c) => c.plan(&track.resource_type, configured),
        None => capability::Plan {
            write_mode: configured,
            if_match: true,
            delete: true,
            notes: Vec::new(),
        },
    }
}

fn plan_put(
    track: &Track,
    mut body: Value,
    row: Option<&Row>,
    c: &Claimed,
    state: &Synced,
    (base, how): (&str, &capability::Plan),
) -> Action {
    let identifier = identifier_for(track, row, &c.resource_key, base);
    // Once the server has given the resource an id, address it by that id: a conditional PUT
    // re-resolves the identifier on every write, and would create a second resource if the
    // identifier changed or if the server parses it differently (a '|' in the system). The
    // version precondition makes a write the worker gave up on (timeout) fail if it reaches
    // the server after a newer one: without it a late request could leave a stale state there.
    let mode = how.write_mode;
    if let (Some(id), false) = (&state.fhir_id, state.deleted) {
        if mode == WriteMode::CreateOnly {
            return Action::Fail(
                Class::NotSendable,
                format!(
                    "{} row {}: the table's write mode is create_only and its resource was created; the server takes no update of it",
                    track.name, c.resource_key
                ),
            );
        }
        body["id"] = Value::String(id.clone());
        return Action::Put {
            path: format!("{}/{}", track.resource_type, id),
            body: Box::new(body),
            identifier,
            if_match: state
                .version
                .as_deref()
                .filter(|_| how.if_match)
                .map(weak_etag),
            create: None,
        };
    }
    let search = identifier_query(&identifier.0, &identifier.1);
    if mode == WriteMode::Upsert {
        return Action::Put {
            path: format!("{}?{search}", track.resource_type),
            body: Box::new(body),
            identifier,
            if_match: None,
            create: None,
        };
    }
    Action::Put {
        path: track.resource_type.clone(),
        body: Box::new(body),
        identifier,
        if_match: None,
        create: Some(Box::new(Create {
            if_none_exist: search,
            update_found: mode == WriteMode::Create,
        })),
    }
}

fn plan_delete(
    track: &Track,
    c: &Claimed,
    state: &Synced,
    base: &str,
    how: &capability::Plan,
) -> Action {
    if state.deleted {
        return Action::AlreadyGone;
    }
    if (state.fhir_id.is_some() || state.identifier.is_some()) && !how.delete {
        return Action::Fail(
            Class::NotSendable,
            format!(
                "{} row {}: the server's CapabilityStatement declares no delete of {}",
                track.name, c.resource_key, track.resource_type
            ),
        );
    }
    if let Some(id) = &state.fhir_id {
        return Action::Delete {
            path: format!("{}/{}", track.resource_type, id),
            identifier: state.identifier.clone(),
        };
    }
    let identifier = match track.mapper {
        Mapper::Patient => c.identifier.clone().or_else(|| state.identifier.clone()),
        Mapper::Function if track.identifier_column.is_some() => state.identifier.clone(),
        _ => Some(identifier_for(track, None, &c.resource_key, base)),
    };
    match identifier {
        Some((s, v)) => Action::Delete {
            path: format!("{}?{}", track.resource_type, identifier_query(&s, &v)),
            identifier: Some((s, v)),
        },
        None => Action::AlreadyGone,
    }
}

/// Sync state of the Patients and Encounters that a batch of rows references.
struct References {
    patient: Option<(pg_sys::Oid, Option<Track>, HashMap<String, Synced>)>,
    encounter: Option<(pg_sys::Oid, Option<Track>, HashMap<String, Synced>)>,
}

impl References {
    fn load(
        schema: &str,
        tracks: &HashMap<pg_sys::Oid, Track>,
        track: &Track,
        rows: &HashMap<String, Row>,
    ) -> Result<References, FhirSyncError> {
        if !matches!(
            track.mapper,
            Mapper::Encounter | Mapper::BloodPressure | Mapper::Pulse
        ) {
            return Ok(References {
                patient: None,
                encounter: None,
            });
        }
        let load = |target: Option<pg_sys::Oid>, column: &str| -> Result<_, FhirSyncError> {
            let Some(t) = target else { return Ok(None) };
            let keys: Vec<String> = rows
                .values()
                .filter_map(|r| text_of(r.get(column)))
                .collect();
            let states = if keys.is_empty() {
                HashMap::new()
            } else {
                source::sync_states(schema, t, &keys, false)?
            };
            Ok(Some((t, tracks.get(&t).cloned(), states)))
        };
        Ok(References {
            patient: load(track.patient_ref, "patient_id")?,
            encounter: if track.mapper == Mapper::Encounter {
                None
            } else {
                load(track.encounter_ref, "form_id")?
            },
        })
    }

    fn resolve(
        &self,
        row: &Row,
        track: &Track,
        c: &Claimed,
        mode: Mode,
        deps: &mut Vec<(pg_sys::Oid, String)>,
    ) -> Result<Refs, Action> {
        let subject = match text_of(row.get("patient_id")) {
            // The mapper reports the missing patient_id with the field's name.
            None => None,
            Some(k) => Some(Self::one(
                &self.patient,
                "patient_id",
                "Patient",
                &k,
                track,
                c,
                mode,
                deps,
            )?),
        };
        let encounter = match text_of(row.get("form_id")) {
            None => None,
            Some(k) if self.encounter.is_some() => Some(Self::one(
                &self.encounter,
                "form_id",
                "Encounter",
                &k,
                track,
                c,
                mode,
                deps,
            )?),
            Some(_) => None,
        };
        Ok(Refs { subject, encounter })
    }

    #[allow(clippy::too_many_arguments)]
    fn one(
        target: &Option<(pg_sys::Oid, Option<Track>, HashMap<String, Synced>)>,
        column: &str,
        kind: &str,
        key: &str,
        track: &Track,
        c: &Claimed,
        mode: Mode,
        deps: &mut Vec<(pg_sys::Oid, String)>,
    ) -> Result<Value, Action> {
        let Some((table, target_track, states)) = target else {
            return Err(Action::Fail(Class::Unmappable, format!("{} row {}: field \"{column}\" refers to a {kind}, but no {kind} table is tracked", track.name, c.resource_key)));
        };
        let Some(target_track) = target_track else {
            return Err(Action::Fail(
                Class::Unmappable,
                format!(
                    "{} row {}: field \"{column}\" refers to a table that is not tracked",
                    track.name, c.resource_key
                ),
            ));
        };
        match states.get(key) {
            Some(Synced {
                fhir_id: Some(id),
                deleted: false,
                ..
            }) => Ok(json!({"reference": format!("{}/{}", target_track.resource_type, id)})),
            Some(Synced { deleted: true, .. }) => Err(Action::Fail(
                Class::Unmappable,
                format!(
                    "{} row {}: the {kind} it refers to was deleted",
                    track.name, c.resource_key
                ),
            )),
            _ if mode == Mode::Preview => Ok(
                json!({"type": target_track.resource_type, "display": format!("{} row {key} (not on the FHIR server yet)", target_track.name)}),
            ),
            _ if c.age_s > crate::gucs::dependency_timeout_s() as f64 => Err(Action::Fail(
                Class::Dependency,
                format!(
                    "{} row {}: waited {:.0} s for {} row {key} to reach the FHIR server",
                    track.name, c.resource_key, c.age_s, target_track.name
                ),
            )),
            _ => {
                deps.push((*table, key.to_string()));
                Err(Action::Wait(format!(
                    "waiting for {} row {key}",
                    target_track.name
                )))
            }
        }
    }
}
