//! The source side of a resource: which tables are tracked and how, and reading their rows
//! as they stand now (`to_json`, so any column type reaches the mappers in one form; to_json
//! writes text directly, where to_jsonb builds a binary tree that is then printed).
//!
//! Every statement here names schemas explicitly and runs under the pinned search_path (the
//! worker's, or `sandbox::pinned` in a user's session). Reading a tracked table runs its
//! owner's code (casts, output functions, the mapping function): always through
//! `read_as_owner`, as that owner, sandboxed.

use crate::error::FhirSyncError;
use crate::mapping::Row;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use std::collections::HashMap;

pub use crate::mapping::registry::Mapper;

#[derive(Clone, Debug)]
pub struct Track {
    pub relid: pg_sys::Oid,
    /// The table's row type: what its mapping function must take.
    pub reltype: pg_sys::Oid,
    /// The owner a superuser accepted for the mapping function when it is not the table's.
    pub map_function_owner: Option<pg_sys::Oid>,
    /// The table's owner: rows are read and mapping functions run with its rights (`as_owner`).
    /// Read with the tracks, so an ownership change reaches the worker within policy::CATALOG_TTL.
    pub owner: pg_sys::Oid,
    /// schema.table, unquoted: the name in messages and in derived identifier systems.
    pub name: String,
    /// Quoted for SQL.
    pub sql_name: String,
    pub resource_type: String,
    pub mapper: Mapper,
    pub key_column: String,
    pub key_type: String,
    pub parent: Option<(pg_sys::Oid, String, String)>,
    pub map_function: Option<pg_sys::Oid>,
    pub identifier_column: Option<String>,
    pub identifier_system: Option<String>,
    /// How its resources are written; None: fhir_sync.write_mode.
    pub write_mode: Option<fhir_sync_core::send::WriteMode>,
    /// Tables that the patient_id and form_id columns point at (foreign key, or else the
    /// tracked Patient / Encounter table of the same owner: never another owner's).
    pub patient_ref: Option<pg_sys::Oid>,
    pub encounter_ref: Option<pg_sys::Oid>,
}

/// The first column of the first row, or None when there is no row (pgrx's `Spi::get_one`
/// treats "no row" as an error).
pub fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Option<T>, FhirSyncError> {
    Spi::connect(|client| {
        let t = client.select(sql, Some(1), args)?;
        if t.is_empty() {
            return Ok(None);
        }
        Ok(t.first().get::<T>(1)?)
    })
}

/// Where the extension is, for the worker.
pub enum Extension {
    Missing,
    /// Its SQL is of another version than this library: the tables the settle writes may not be
    /// there (0.6.0 added the history and the version cache), so nothing is claimed until
    /// ALTER EXTENSION … UPDATE.
    OtherVersion,
    /// In this schema, quoted.
    In(String),
}

fn installed() -> Result<Option<(String, String)>, FhirSyncError> {
    Spi::connect(|client| {
        let t = client.select(
            "SELECT n.nspname::text, e.extversion::text FROM pg_catalog.pg_extension e \
             JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'fhir_sync'",
            Some(1),
            &[],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let (schema, version) = t.first().get_two::<String, String>()?;
        Ok(schema.map(|s| (quote_identifier(s), version.unwrap_or_default())))
    })
}

/// The extension's schema, quoted, whatever its version (the SQL functions run in it), or None
/// when the extension is not installed here.
pub fn extension_schema() -> Result<Option<String>, FhirSyncError> {
    Ok(installed()?.map(|(schema, _)| schema))
}

pub fn extension_for_worker() -> Result<Extension, FhirSyncError> {
    Ok(match installed()? {
        None => Extension::Missing,
        Some((_, version)) if version != env!("CARGO_PKG_VERSION") => Extension::OtherVersion,
        Some((schema, _)) => Extension::In(schema),
    })
}

/// Every tracked table, keyed by relation.
pub fn load_tracks(schema: &str) -> Result<HashMap<pg_sys::Oid, Track>, FhirSyncError> {
    let sql = format!(
        "WITH t AS (SELECT t.*, c.relname::text AS relname, n.nspname::text AS nspname, c.relowner, c.reltype
                      FROM {schema}.fhir_tracked t
                      JOIN pg_catalog.pg_class c ON c.oid = t.table_name
                      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace)
         SELECT t.table_name::pg_catalog.oid, t.nspname, t.relname, t.resource_type, t.mapper, t.key_column::text,
                (SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = t.table_name AND a.attname = t.key_column),
                t.parent_table::pg_catalog.oid, t.parent_column::text,
                (SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = t.table_name AND a.attname = t.parent_column),
                t.map_function::pg_catalog.oid, t.identifier_column::text, t.identifier_system,
                {patient_ref}, {encounter_ref}, t.relowner, t.reltype, t.map_function_owner::pg_catalog.oid,
                -- Read through the row: a worker of this version may run against the previous
                -- schema until ALTER EXTENSION … UPDATE, which has no such column yet.
                pg_catalog.to_jsonb(t) ->> 'write_mode'
           FROM t",
        patient_ref = ref_target(schema, &crate::mapping::registry::PATIENT_REF),
        encounter_ref = ref_target(schema, &crate::mapping::registry::ENCOUNTER_REF),
    );
    Spi::connect(|client| {
        let mut out = HashMap::new();
        for row in client.select(sql.as_str(), None, &[])? {
            let relid: pg_sys::Oid = row.get(1)?.unwrap_or(pg_sys::InvalidOid);
            let nsp: String = row.get(2)?.unwrap_or_default();
            let rel: String = row.get(3)?.unwrap_or_default();
            let mapper: String = row.get(5)?.unwrap_or_default();
            let Some(mapper) = Mapper::parse(&mapper) else {
                continue;
            };
            let parent = match (
                row.get::<pg_sys::Oid>(8)?,
                row.get::<String>(9)?,
                row.get::<String>(10)?,
            ) {
                (Some(o), Some(c), Some(t)) => Some((o, c, t)),
                _ => None,
            };
            out.insert(
                relid,
                Track {
                    relid,
                    reltype: row.get(17)?.unwrap_or(pg_sys::InvalidOid),
                    map_function_owner: row.get(18)?,
                    owner: row.get(16)?.unwrap_or(pg_sys::InvalidOid),
                    name: format!("{nsp}.{rel}"),
                    sql_name: format!("{}.{}", quote_identifier(&nsp), quote_identifier(&rel)),
                    resource_type: row.get(4)?.unwrap_or_default(),
                    mapper,
                    key_column: row.get(6)?.unwrap_or_default(),
                    key_type: row.get(7)?.unwrap_or_else(|| "text".into()),
                    parent,
                    map_function: row.get(11)?,
                    identifier_column: row.get(12)?,
                    identifier_system: row.get(13)?,
                    patient_ref: row.get(14)?,
                    encounter_ref: row.get(15)?,
                    write_mode: row
                        .get::<String>(19)?
                        .and_then(|m| fhir_sync_core::send::WriteMode::parse(&m)),
                },
            );
        }
        Ok::<_, FhirSyncError>(out)
    })
}

/// The table a reference column points at, by the one rule (sql/track.sql,
/// fhir_reference_target).
fn ref_target(schema: &str, r: &crate::mapping::registry::Reference) -> String {
    format!(
        "{schema}.fhir_reference_target(t.table_name, '{}', '{}')::pg_catalog.oid",
        r.column,
        r.mapper.name()
    )
}

/// Runs `f`, which reads `track`'s rows (and so runs code its owner controls), sandboxed, as
/// `sandbox::runner_for` says: in the worker as the table's owner; in a user's session
/// (fhir_preview) as the owner only for a caller who has the owner's privileges anyway, else as the
/// caller (its own rights, row-level security and all), who must be allowed to read the table.
fn read_as_owner<R>(track: &Track, f: impl FnOnce() -> R) -> Result<R, FhirSyncError> {
    let runner = crate::sandbox::runner_for(track.owner);
    if runner != track.owner {
        require_select(track.relid, &track.name)?;
    }
    crate::sandbox::as_owner(runner, f).map_err(FhirSyncError::from)
}

/// The caller may SELECT from `relid`, or gets the error PostgreSQL would give.
pub fn require_select(relid: pg_sys::Oid, name: &str) -> Result<(), FhirSyncError> {
    // SAFETY: a catalog lookup for the current user, in the caller's transaction. For a missing
    // relation pg_class_aclcheck raises an ERROR (a panic through pgrx's guard), not NO_PRIV.
    let ok = unsafe {
        pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as _)
            == pg_sys::AclResult::ACLCHECK_OK
    };
    if ok {
        Ok(())
    } else {
        Err(FhirSyncError::NoPrivilege(name.to_string()))
    }
}

/// Rows of `track` by primary key, as they are now; a key with no row is absent from the map.
pub fn fetch_rows(track: &Track, keys: &[String]) -> Result<HashMap<String, Row>, FhirSyncError> {
    let sql = rows_sql(track);
    read_as_owner(track, || {
        crate::sandbox::generic_plans_for(track.relid);
        fetch_keyed(&sql, keys)
    })?
}

fn rows_sql(track: &Track) -> String {
    format!(
        "SELECT s.{key}::text, pg_catalog.to_json(s) FROM {table} s WHERE s.{key} = ANY ($1::text[]::{ty}[])",
        key = quote_identifier(&track.key_column),
        table = track.sql_name,
        ty = track.key_type,
    )
}

/// Keys of rows that could not be read, with the reason.
pub type Unreadable = HashMap<String, FhirSyncError>;

/// Like `fetch_rows`, but a row whose reading raises an error (a failing cast of one of its
/// columns, owners' code that times out) is reported on its own instead of failing the whole
/// batch: the batch is read at once, and on error again row by row. A table whose lock is not
/// granted in time is not read row by row (each row would wait as long): every key gets that
/// error, and its changes wait while the rest of the batch goes on.
pub fn fetch_rows_isolated(track: &Track, keys: &[String]) -> (HashMap<String, Row>, Unreadable) {
    isolated(
        keys,
        |some| fetch_rows(track, some),
        |key, e| unreadable(track, key, e),
    )
}

/// Reads `keys` with `read`, at once, then (on an error other than a lock timeout) one by one.
fn isolated<V>(
    keys: &[String],
    read: impl Fn(&[String]) -> Result<HashMap<String, V>, FhirSyncError>,
    wrap: impl Fn(&str, FhirSyncError) -> FhirSyncError,
) -> (HashMap<String, V>, Unreadable) {
    let (mut rows, mut errors) = (HashMap::new(), HashMap::new());
    match read(keys) {
        Ok(all) => return (all, errors),
        Err(e) if keys.len() == 1 || e.pg().is_some_and(|p| p.is_lock_timeout()) => {
            for key in keys {
                errors.insert(key.clone(), wrap(key, e.clone()));
            }
            return (rows, errors);
        }
        Err(_) => {}
    }
    // One row that times out costs a statement_timeout; the rest of the batch waits for the next
    // cycle rather than risk as many timeouts as rows (a batch must settle well within its lease).
    let (started, budget) = (std::time::Instant::now(), batch_budget());
    let mut timed_out = false;
    for key in keys {
        if timed_out || started.elapsed() > budget {
            errors.insert(key.clone(), deferred());
            continue;
        }
        match read(std::slice::from_ref(key)) {
            Ok(one) => rows.extend(one),
            Err(e) => {
                timed_out = e.pg().is_some_and(|p| p.is_timeout());
                errors.insert(key.clone(), wrap(key, e));
            }
        }
    }
    (rows, errors)
}

fn deferred() -> FhirSyncError {
    FhirSyncError::Deferred(
        "not read: its batch's rows took longer than fhir_sync.statement_timeout; retried".into(),
    )
}

/// How long reading one table's batch row by row may take before the rest waits for the next
/// cycle: one statement timeout (a second when there is none), well inside the lease.
fn batch_budget() -> std::time::Duration {
    let ms = crate::gucs::statement_timeout_ms().max(0) as u64;
    let lease = crate::gucs::lease_time_ms().max(0) as u64 / 4;
    std::time::Duration::from_millis(if ms == 0 { 1_000 } else { ms.min(lease.max(1)) })
}

fn unreadable(track: &Track, key: &str, e: FhirSyncError) -> FhirSyncError {
    match e {
        FhirSyncError::Pg(error) => FhirSyncError::Unreadable {
            table: track.name.clone(),
            key: key.to_string(),
            error,
        },
        other => other,
    }
}

/// Rows of a child table (patient_other_identifiers) grouped by their parent's key, each
/// parent on its own when a batch cannot be read (as `fetch_rows_isolated`).
pub fn fetch_children(
    child: &Track,
    parent_keys: &[String],
) -> (HashMap<String, Vec<Row>>, Unreadable) {
    isolated(
        parent_keys,
        |some| fetch_children_of(child, some),
        |key, e| unreadable(child, key, e),
    )
}

fn fetch_children_of(
    child: &Track,
    parent_keys: &[String],
) -> Result<HashMap<String, Vec<Row>>, FhirSyncError> {
    let Some((_, col, ty)) = &child.parent else {
        return Ok(HashMap::new());
    };
    let sql = format!(
        "SELECT s.{col}::text, pg_catalog.to_json(s) FROM {table} s WHERE s.{col} = ANY ($1::text[]::{ty}[]) ORDER BY s.{key}",
        col = quote_identifier(col),
        table = child.sql_name,
        key = quote_identifier(&child.key_column),
    );
    let keys = keys_arg(parent_keys);
    read_as_owner(child, || {
        crate::sandbox::generic_plans_for(child.relid);
        Spi::connect(|client| {
            let mut out: HashMap<String, Vec<Row>> = HashMap::new();
            for row in crate::plans::select(client, &sql, None, &[keys.into()])? {
                if let (Some(k), Some(pgrx::Json(serde_json::Value::Object(r)))) =
                    (row.get::<String>(1)?, row.get::<pgrx::Json>(2)?)
                {
                    out.entry(k).or_default().push(r);
                }
            }
            Ok(out)
        })
    })?
}

fn keys_arg(keys: &[String]) -> Vec<Option<String>> {
    keys.iter().cloned().map(Some).collect()
}

fn fetch_keyed(sql: &str, keys: &[String]) -> Result<HashMap<String, Row>, FhirSyncError> {
    let keys = keys_arg(keys);
    Spi::connect(|client| {
        let mut out = HashMap::new();
        for row in crate::plans::select(client, sql, None, &[keys.into()])? {
            if let (Some(k), Some(pgrx::Json(serde_json::Value::Object(r)))) =
                (row.get::<String>(1)?, row.get::<pgrx::Json>(2)?)
            {
                out.insert(k, r);
            }
        }
        Ok(out)
    })
}

/// What the server holds for a resource, from fhir_sync_state.
#[derive(Clone, Debug, Default)]
pub struct Synced {
    pub fhir_id: Option<String>,
    /// The version the server gave the last write, when it said.
    pub version: Option<String>,
    pub identifier: Option<(String, String)>,
    pub deleted: bool,
}

/// One primary-key probe per key (LATERAL … LIMIT 1 keeps the keys outside): the table grows
/// with every synced row and its statistics lag behind, and without them `resource_key = ANY`
/// was planned as a bitmap scan of the whole table's entries for the first key column.
///
/// `versions`: also the version of each resource's last write (for If-Match): the unlogged cache's
/// when a later settle wrote it than the logged row's last rewrite, else the logged row's (after a
/// crash emptied the cache, a stale one costs a 412 and a re-read). Without: no version
/// (references and previews need none).
pub fn sync_states(
    schema: &str,
    table: pg_sys::Oid,
    keys: &[String],
    versions: bool,
) -> Result<HashMap<String, Synced>, FhirSyncError> {
    let (version, cache) = if versions {
        (
            "CASE WHEN v.synced_at >= s.last_synced_at THEN v.fhir_version ELSE s.fhir_version END",
            format!(
                "LEFT JOIN LATERAL (
                    SELECT v.synced_at, v.fhir_version FROM {schema}.fhir_sync_version v
                     WHERE v.resource_table = $1::pg_catalog.regclass AND v.resource_key = k.key
                     LIMIT 1) AS v ON true"
            ),
        )
    } else {
        ("NULL::text", String::new())
    };
    let sql = format!(
        "SELECT s.resource_key, s.fhir_id, s.identifier_system, s.identifier_value, s.deleted, {version}
           FROM unnest($2::text[]) AS k(key)
          CROSS JOIN LATERAL (
                SELECT * FROM {schema}.fhir_sync_state s
                 WHERE s.resource_table = $1::pg_catalog.regclass AND s.resource_key = k.key
                 LIMIT 1) AS s
          {cache}"
    );
    let keys = keys_arg(keys);
    Spi::connect(|client| {
        let mut out = HashMap::new();
        for row in crate::plans::select(client, &sql, None, &[table.into(), keys.into()])? {
            let key: String = row.get(1)?.unwrap_or_default();
            let identifier = match (row.get::<String>(3)?, row.get::<String>(4)?) {
                (Some(s), Some(v)) => Some((s, v)),
                _ => None,
            };
            // What an older version stored unchecked never reaches a URL or header either.
            let valid = |v: Option<String>| v.filter(|s| crate::http::is_fhir_id(s));
            out.insert(
                key,
                Synced {
                    fhir_id: valid(row.get(2)?),
                    identifier,
                    deleted: row.get(5)?.unwrap_or(false),
                    version: valid(row.get(6)?),
                },
            );
        }
        Ok(out)
    })
}

/// The key of `fhir_sync_state_identifier_idx` (sql/schema.sql), spelled as the index spells it
/// so that a lookup can use it: a hash of value and system (the reader then compares the text).
fn identity_hash(system: &str, value: &str) -> String {
    format!("pg_catalog.hashtextextended({value}, pg_catalog.hashtextextended({system}, 0))")
}

/// The guard's two lookups: the rows that hold each identity ($1 types, $2 systems, $3 values),
/// and the rows that map to each resource id ($1 types, $2 ids). Each probes its hashed index
/// (sql/schema.sql), then compares the text. `fhir_id IS NOT NULL` is the id index's predicate,
/// stated so that the planner may use it.
pub(crate) fn holders_sql(schema: &str) -> (String, String) {
    let by_identity = format!(
        "SELECT k.t, k.sys, k.val, s.resource_table::pg_catalog.oid, s.resource_key,
                s.resource_table::pg_catalog.text
           FROM unnest($1::text[], $2::text[], $3::text[]) AS k(t, sys, val)
          CROSS JOIN LATERAL (
                SELECT s.resource_table, s.resource_key FROM {schema}.fhir_sync_state s
                 WHERE {} = {}
                   AND s.identifier_value = k.val AND s.identifier_system = k.sys
                   AND s.resource_type = k.t AND NOT s.deleted
                 LIMIT 16) AS s",
        identity_hash("s.identifier_system", "s.identifier_value"),
        identity_hash("k.sys", "k.val"),
    );
    let by_id = format!(
        "SELECT k.t, k.id, s.resource_table::pg_catalog.oid, s.resource_key,
                s.resource_table::pg_catalog.text
           FROM unnest($1::text[], $2::text[]) AS k(t, id)
          CROSS JOIN LATERAL (
                SELECT s.resource_table, s.resource_key FROM {schema}.fhir_sync_state s
                 WHERE pg_catalog.hashtextextended(s.fhir_id, 0) = pg_catalog.hashtextextended(k.id, 0)
                   AND s.fhir_id = k.id AND s.fhir_id IS NOT NULL
                   AND s.resource_type = k.t AND NOT s.deleted
                 LIMIT 16) AS s"
    );
    (by_identity, by_id)
}

/// Who else maps to each identity (fhir_sync_state rows not deleted: synced, or reserved for a
/// first write) and to each resource id; and the names of their tables (oid → schema.table).
#[allow(clippy::type_complexity)]
pub fn identifier_holders(
    schema: &str,
    wanted: &[&fhir_sync_core::identity::Identity],
    ids: &[(String, String)],
) -> Result<(fhir_sync_core::identity::Holders, HashMap<u32, String>), FhirSyncError> {
    use fhir_sync_core::identity::{Holders, Identity};
    let (by_identity, by_id) = holders_sql(schema);
    let col = |f: fn(&Identity) -> &String| -> Vec<Option<String>> {
        wanted.iter().map(|w| Some(f(w).clone())).collect()
    };
    let args = [
        col(|w| &w.resource_type).into(),
        col(|w| &w.system).into(),
        col(|w| &w.value).into(),
    ];
    // A row found for a key: its table's name kept for messages, the row listed once.
    fn found(
        rows: &mut Vec<fhir_sync_core::identity::RowRef>,
        names: &mut HashMap<u32, String>,
        (table, key, name): (pg_sys::Oid, String, Option<String>),
    ) {
        if let Some(n) = name {
            names.insert(table.to_u32(), n);
        }
        if !rows.contains(&(table.to_u32(), key.clone())) {
            rows.push((table.to_u32(), key));
        }
    }
    // Read-write execution, for its snapshot: a read-only SPI statement sees the transaction's
    // first snapshot, taken before the identity locks were granted, and would miss the
    // reservation another worker committed while this one waited for them (both rows then
    // written to one resource: seen with two workers). Each read-write statement takes a new one.
    Spi::connect_mut(|client| {
        let mut holders = Holders::default();
        let mut names = HashMap::new();
        if !wanted.is_empty() {
            for row in crate::plans::update(client, &by_identity, &args)? {
                let identity = Identity {
                    resource_type: row.get(1)?.unwrap_or_default(),
                    system: row.get(2)?.unwrap_or_default(),
                    value: row.get(3)?.unwrap_or_default(),
                };
                let holder = (
                    row.get(4)?.unwrap_or(pg_sys::InvalidOid),
                    row.get(5)?.unwrap_or_default(),
                    row.get(6)?,
                );
                found(
                    holders.by_identity.entry(identity).or_default(),
                    &mut names,
                    holder,
                );
            }
        }
        if !ids.is_empty() {
            let types: Vec<Option<String>> = ids.iter().map(|(t, _)| Some(t.clone())).collect();
            let fids: Vec<Option<String>> = ids.iter().map(|(_, i)| Some(i.clone())).collect();
            for row in crate::plans::update(client, &by_id, &[types.into(), fids.into()])? {
                let key = (
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                );
                let holder = (
                    row.get(3)?.unwrap_or(pg_sys::InvalidOid),
                    row.get(4)?.unwrap_or_default(),
                    row.get(5)?,
                );
                found(holders.by_id.entry(key).or_default(), &mut names, holder);
            }
        }
        Ok((holders, names))
    })
}

/// A row as messages name it: `schema.table key 42` (never its identifier).
pub fn row_name(names: &HashMap<u32, String>, r: &fhir_sync_core::identity::RowRef) -> String {
    format!(
        "{} key {}",
        names
            .get(&r.0)
            .map(String::as_str)
            .unwrap_or("a dropped table"),
        r.1
    )
}

/// Serialises first writes of one identifier across workers: a transaction-level advisory lock
/// per identity, in fhir_sync's own key space (a two-int lock whose first half spells 'FHRS').
/// Only tried, never waited for: any role may take advisory locks, and one holding this key must
/// hold back that one resource, not the worker. Returns the identities whose lock is held
/// elsewhere.
pub fn lock_identities(
    wanted: &[&fhir_sync_core::identity::Identity],
) -> Result<Vec<fhir_sync_core::identity::Identity>, FhirSyncError> {
    let key = |w: &fhir_sync_core::identity::Identity| {
        format!("{}|{}|{}", w.resource_type, w.system, w.value)
    };
    let keys: Vec<Option<String>> = wanted.iter().map(|w| Some(key(w))).collect();
    Spi::connect(|client| {
        let mut busy = Vec::new();
        for row in crate::plans::select(
            client,
            "SELECT k FROM unnest($1::text[]) AS k
              WHERE NOT pg_catalog.pg_try_advisory_xact_lock(1179144787, pg_catalog.hashtext(k))",
            None,
            &[keys.into()],
        )? {
            let k: String = row.get(1)?.unwrap_or_default();
            busy.extend(wanted.iter().filter(|w| key(w) == k).map(|w| (*w).clone()));
        }
        Ok(busy)
    })
}

/// Records, before a first write is sent, that the row holds its identifier: a fhir_sync_state
/// row without a resource id (a row's earlier, deleted resource is forgotten: the write makes
/// a new one). Settling the write fills in the id. Each claim comes with whether the row has a
/// state row already: a new row's reservation is a plain insert (an upsert is a speculative
/// insert, one more WAL record per first write). The leases keep any other writer of the row
/// away; a row inserted meanwhile by someone else fails this map, and so the cycle, before
/// anything is sent.
pub fn reserve_identities(
    schema: &str,
    claims: &[(&fhir_sync_core::identity::Claim, bool)],
) -> Result<(), FhirSyncError> {
    let columns = |recorded: bool| {
        let of: Vec<&fhir_sync_core::identity::Claim> = claims
            .iter()
            .filter(|(_, r)| *r == recorded)
            .map(|(c, _)| *c)
            .collect();
        let rts: Vec<pg_sys::Oid> = of.iter().map(|c| pg_sys::Oid::from(c.row.0)).collect();
        let rks: Vec<String> = of.iter().map(|c| c.row.1.clone()).collect();
        let tys: Vec<String> = of
            .iter()
            .map(|c| c.identity.resource_type.clone())
            .collect();
        let sys: Vec<String> = of.iter().map(|c| c.identity.system.clone()).collect();
        let vals: Vec<String> = of.iter().map(|c| c.identity.value.clone()).collect();
        (
            of.len(),
            [rts.into(), rks.into(), tys.into(), sys.into(), vals.into()],
        )
    };
    let insert = format!(
        "INSERT INTO {schema}.fhir_sync_state AS s (resource_table, resource_key, resource_type,
                identifier_system, identifier_value, deleted, last_synced_at)
         SELECT u.rt::pg_catalog.regclass, u.rk, u.ty, u.sys, u.val, false, pg_catalog.now()
           FROM unnest($1::oid[], $2::text[], $3::text[], $4::text[], $5::text[]) AS u(rt, rk, ty, sys, val)"
    );
    let upsert = format!(
        "{insert}
         ON CONFLICT (resource_table, resource_key) DO UPDATE SET
                resource_type = excluded.resource_type,
                identifier_system = excluded.identifier_system,
                identifier_value = excluded.identifier_value,
                fhir_id = NULL, fhir_version = NULL, deleted = false
          WHERE s.fhir_id IS NULL OR s.deleted"
    );
    Spi::connect_mut(|client| {
        for (recorded, sql) in [(false, &insert), (true, &upsert)] {
            let (n, args) = columns(recorded);
            if n > 0 {
                crate::plans::update(client, sql, &args)?;
            }
        }
        Ok(())
    })
}

/// The mapping function fhir_tracked names for `relid` now, and the owner accepted for it: the
/// tracks the worker keeps may be a few seconds old, and a DBA who tracks a table again (a new
/// function) and requeues at once must not see the old function refused again.
pub fn current_map_function(schema: &str, track: &Track) -> Result<Track, FhirSyncError> {
    let sql = format!(
        "SELECT t.map_function::pg_catalog.oid, t.map_function_owner::pg_catalog.oid
           FROM {schema}.fhir_tracked t WHERE t.table_name = $1::pg_catalog.regclass"
    );
    let mut current = track.clone();
    Spi::connect(|client| {
        for row in crate::plans::select(client, &sql, Some(1), &[track.relid.into()])? {
            current.map_function = row.get(1)?;
            current.map_function_owner = row.get(2)?;
        }
        Ok::<_, FhirSyncError>(())
    })?;
    Ok(current)
}

/// What may be wrong with a tracked table's mapping function now: it must still be the
/// function that was registered (one argument, the table's row type; jsonb or json), owned by the
/// table's owner or by the owner a superuser accepted at `fhir_track`. Checked before every run:
/// `ALTER FUNCTION … OWNER TO` or a dropped-and-recreated function is refused, not run.
pub fn check_map_function(track: &Track, function: pg_sys::Oid) -> Result<pg_sys::Oid, String> {
    // SAFETY: pg_proc's syscache by OID, in the caller's transaction, read as FormData_pg_proc:
    // its fixed part, and proargtypes.values[0] when pronargs is 1 (proargtypes is the first
    // variable-length field, at its fixed offset, as PostgreSQL's own code reads it).
    let found = unsafe {
        crate::catalog::row(
            pg_sys::SysCacheIdentifier::PROCOID,
            function.into(),
            |p: &pg_sys::FormData_pg_proc| {
                let nargs = p.pronargs as usize;
                let arg = if nargs == 1 {
                    p.proargtypes.values.as_slice(1)[0]
                } else {
                    pg_sys::InvalidOid
                };
                (p.proowner, nargs, arg, p.prorettype, p.proretset)
            },
        )
    };
    let Some((owner, nargs, arg, ret, retset)) = found else {
        return Err(format!(
            "mapping function of {} no longer exists; track the table again",
            track.name
        ));
    };
    if nargs != 1 || arg != track.reltype || retset {
        return Err(format!(
            "mapping function of {} no longer takes exactly one {} row; track the table again",
            track.name, track.name
        ));
    }
    if ret != pg_sys::JSONBOID && ret != pg_sys::JSONOID {
        return Err(format!(
            "mapping function of {} must return jsonb",
            track.name
        ));
    }
    if owner != track.owner && Some(owner) != track.map_function_owner {
        return Err(format!(
            "mapping function of {} is owned by a role other than the table's owner; track the table again (a superuser may accept that owner)",
            track.name
        ));
    }
    Ok(ret)
}

/// Runs a tracked table's mapping function on its rows, by OID (a function planted under the
/// same name is never called), one sandboxed call per row so that one bad row cannot fail the
/// others. Returns per key: the resource or the error; a key with no row is absent.
pub fn run_map_function(
    track: &Track,
    function: pg_sys::Oid,
    keys: &[String],
) -> HashMap<String, Result<serde_json::Value, FhirSyncError>> {
    let mut out = HashMap::new();
    if crate::sandbox::runner_for(track.owner) != track.owner {
        // A caller without the owner's privileges would run the owner's function with its own
        // rights (its server-file or -program roles, dblink, setval survive the rollback).
        for key in keys {
            out.insert(
                key.clone(),
                Err(FhirSyncError::MapFunction(format!(
                    "{} maps through its owner's function, which only a role with the owner's privileges may run through fhir_sync",
                    track.name
                ))),
            );
        }
        return out;
    }
    let rettype = match check_map_function(track, function) {
        Ok(t) => t,
        Err(e) => {
            for key in keys {
                out.insert(key.clone(), Err(FhirSyncError::MapFunction(e.clone())));
            }
            return out;
        }
    };
    let sql = std::ffi::CString::new(format!(
        "SELECT s FROM {table} s WHERE s.{key} = ($1::text)::{ty}",
        key = quote_identifier(&track.key_column),
        table = track.sql_name,
        ty = track.key_type,
    ))
    .expect("quoted names hold no NUL");
    let (started, budget) = (std::time::Instant::now(), batch_budget());
    let mut timed_out = false;
    for key in keys {
        if timed_out || started.elapsed() > budget {
            out.insert(key.clone(), Err(deferred()));
            continue;
        }
        // SAFETY: call_on_row's contract: read_as_owner runs it in the sandbox's subtransaction,
        // and check_map_function above vetted `function` and gave `rettype`.
        let result = read_as_owner(track, || unsafe {
            call_on_row(&sql, key, function, rettype)
        });
        timed_out = matches!(&result, Err(FhirSyncError::Pg(e)) if e.is_timeout());
        match result {
            Ok(Some(v)) => {
                out.insert(key.clone(), v);
            }
            Ok(None) => {}
            Err(FhirSyncError::Pg(e)) if e.is_lock_timeout() => {
                out.insert(key.clone(), Err(FhirSyncError::Pg(e)));
            }
            Err(FhirSyncError::Pg(error)) => {
                out.insert(
                    key.clone(),
                    Err(FhirSyncError::MapFunctionFailed {
                        table: track.name.clone(),
                        key: key.clone(),
                        error,
                    }),
                );
            }
            Err(e) => {
                out.insert(key.clone(), Err(e));
            }
        }
    }
    out
}

/// Reads one row (`sql`, $1 its key as text) and calls `function` on it through fmgr. None:
/// no such row; Some(Ok(Null)) for a function that returned NULL.
///
/// # Safety
/// Must run inside a transaction (the sandbox's subtransaction); `function` must have passed
/// `check_map_function` (one argument of the row type, returning `rettype`, jsonb or json).
// SAFETY: upheld by its one caller, run_map_function.
unsafe fn call_on_row(
    sql: &std::ffi::CStr,
    key: &str,
    function: pg_sys::Oid,
    rettype: pg_sys::Oid,
) -> Option<Result<serde_json::Value, FhirSyncError>> {
    use pgrx::{FromDatum, IntoDatum};
    // SAFETY: per the contract. The row datum and the result live in SPI's context and are
    // copied into serde values before SPI_finish; an ERROR leaves SPI to the subxact's abort.
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            return Some(Err(FhirSyncError::Internal("SPI_connect failed".into())));
        }
        let mut argtypes = [pg_sys::TEXTOID];
        let mut values = [key.into_datum().expect("text is never null")];
        let nulls = [b' ' as std::ffi::c_char];
        let rc = pg_sys::SPI_execute_with_args(
            sql.as_ptr(),
            1,
            argtypes.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            true,
            1,
        );
        let mut out = None;
        if rc == pg_sys::SPI_OK_SELECT as i32 && pg_sys::SPI_processed == 1 {
            let table = pg_sys::SPI_tuptable;
            let tuple = *(*table).vals;
            let mut isnull = false;
            let row = pg_sys::SPI_getbinval(tuple, (*table).tupdesc, 1, &mut isnull);
            let mut flinfo: pg_sys::FmgrInfo = std::mem::zeroed();
            pg_sys::fmgr_info(function, &mut flinfo);
            let fcinfo: pg_sys::FunctionCallInfo = pg_sys::palloc0(
                std::mem::size_of::<pg_sys::FunctionCallInfoBaseData>()
                    + std::mem::size_of::<pg_sys::NullableDatum>(),
            )
            .cast();
            (*fcinfo).flinfo = &mut flinfo;
            (*fcinfo).nargs = 1;
            (*fcinfo).fncollation = pg_sys::InvalidOid;
            (*fcinfo).args.as_mut_slice(1)[0] = pg_sys::NullableDatum { value: row, isnull };
            // A direct call through a function pointer is not guarded by pgrx: an ERROR inside
            // would longjmp past every Rust frame (and past the sandbox's catch) to the worker's
            // top-level handler. The boundary turns it into a panic the sandbox catches.
            let call = flinfo.fn_addr.expect("fmgr_info sets fn_addr");
            let result = pg_sys::ffi::pg_guard_ffi_boundary(|| call(fcinfo));
            let value = if (*fcinfo).isnull {
                Some(serde_json::Value::Null)
            } else if rettype == pg_sys::JSONBOID {
                pgrx::JsonB::from_polymorphic_datum(result, false, rettype).map(|j| j.0)
            } else {
                pgrx::Json::from_polymorphic_datum(result, false, rettype).map(|j| j.0)
            };
            out = Some(Ok(value.unwrap_or(serde_json::Value::Null)));
        } else if rc != pg_sys::SPI_OK_SELECT as i32 {
            out = Some(Err(FhirSyncError::Internal(format!(
                "reading a row failed (SPI {rc})"
            ))));
        }
        pg_sys::SPI_finish();
        out
    }
}
