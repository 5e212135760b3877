//! The source side of a resource: which tables are tracked and how, and reading their rows
//! as they stand now (`to_json`, so any column type reaches the mappers in one form; to_json
//! writes text directly, where to_jsonb builds a binary tree that is then printed).
//!
//! Every statement here names schemas explicitly; it is run by the worker (a superuser) and by
//! `fhir_preview`, so nothing may resolve through a caller's search_path.

use crate::error::FhirSyncError;
use crate::mapping::Row;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapper {
    Patient,
    PatientIdentifier,
    Encounter,
    BloodPressure,
    Pulse,
    Function,
}

impl Mapper {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "patient" => Mapper::Patient,
            "patient_identifier" => Mapper::PatientIdentifier,
            "encounter" => Mapper::Encounter,
            "blood_pressure" => Mapper::BloodPressure,
            "pulse" => Mapper::Pulse,
            "function" => Mapper::Function,
            _ => return None,
        })
    }

    /// Send order inside one batch: a Patient before the Encounters that point at it, those
    /// before the Observations that point at both.
    pub fn tier(self) -> usize {
        match self {
            Mapper::Patient | Mapper::PatientIdentifier | Mapper::Function => 0,
            Mapper::Encounter => 1,
            Mapper::BloodPressure | Mapper::Pulse => 2,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Track {
    /// The table's owner: rows are read and mapping functions run with its rights (`as_owner`).
    /// Read with the tracks, so an ownership change reaches the worker within TRACKS_TTL.
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
    /// Tables that the patient_id and form_id columns point at (foreign key, or else the
    /// tracked Patient / Encounter table).
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

/// The extension's schema, quoted, or None when the extension is not installed here.
pub fn extension_schema() -> Result<Option<String>, FhirSyncError> {
    Spi::connect(|client| {
        let t = client.select(
            "SELECT n.nspname::text FROM pg_catalog.pg_extension e \
             JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'fhir_sync'",
            Some(1),
            &[],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        Ok(t.first().get_one::<String>()?.map(quote_identifier))
    })
}

/// Every tracked table, keyed by relation.
pub fn load_tracks(schema: &str) -> Result<HashMap<pg_sys::Oid, Track>, FhirSyncError> {
    let sql = format!(
        "WITH t AS (SELECT t.*, c.relname::text AS relname, n.nspname::text AS nspname, c.relowner
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
                {patient_ref}, {encounter_ref}, t.relowner
           FROM t",
        patient_ref = ref_target(schema, "patient_id", "patient"),
        encounter_ref = ref_target(schema, "form_id", "encounter"),
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
                },
            );
        }
        Ok::<_, FhirSyncError>(out)
    })
}

fn ref_target(schema: &str, column: &str, mapper: &str) -> String {
    format!(
        "coalesce((SELECT c.confrelid FROM pg_catalog.pg_constraint c
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
                    WHERE c.conrelid = t.table_name AND c.contype = 'f' AND a.attname = '{column}'
                    LIMIT 1),
                  (SELECT pg_catalog.min(x.table_name::pg_catalog.oid) FROM {schema}.fhir_tracked x
                    WHERE x.mapper = '{mapper}'))"
    )
}

/// Runs `f` as `owner` (a tracked table's) in a security-restricted operation, when the current
/// user is a superuser (the worker, a superuser's preview). Reading a row with to_json runs the
/// casts of its column types, and a tracked table's mapping function is the owner's code: with
/// the worker's rights, whoever owns a tracked table or its function would act as a superuser.
/// An ordinary role keeps its own rights. (On error, transaction abort restores the user.)
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    if owner == pg_sys::InvalidOid || !unsafe { pg_sys::superuser() } {
        return f();
    }
    let (mut user, mut sec) = (pg_sys::InvalidOid, 0i32);
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
        pg_sys::SetUserIdAndSecContext(
            owner,
            sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    let r = f();
    unsafe { pg_sys::SetUserIdAndSecContext(user, sec) };
    r
}

/// Rows of `track` by primary key, as they are now; a key with no row is absent from the map.
pub fn fetch_rows(track: &Track, keys: &[String]) -> Result<HashMap<String, Row>, FhirSyncError> {
    let sql = format!(
        "SELECT s.{key}::text, pg_catalog.to_json(s) FROM {table} s WHERE s.{key} = ANY ($1::text[]::{ty}[])",
        key = quote_identifier(&track.key_column),
        table = track.sql_name,
        ty = track.key_type,
    );
    as_owner(track.owner, || fetch_keyed(&sql, keys))
}

/// Keys of rows that could not be read, with the reason.
pub type Unreadable = HashMap<String, String>;

/// Like `fetch_rows`, but a row whose reading raises an error (a failing cast of one of its
/// columns, say) is reported on its own instead of failing the whole batch: the batch is read in
/// a subtransaction, and on error again row by row.
pub fn fetch_rows_isolated(
    track: &Track,
    keys: &[String],
) -> Result<(HashMap<String, Row>, Unreadable), FhirSyncError> {
    if let Ok(Ok(rows)) = crate::subxact::subtransaction(|| fetch_rows(track, keys)) {
        return Ok((rows, HashMap::new()));
    }
    let (mut rows, mut errors) = (HashMap::new(), HashMap::new());
    for key in keys {
        match crate::subxact::subtransaction(|| fetch_rows(track, std::slice::from_ref(key)))
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(one) => rows.extend(one),
            Err(e) => {
                errors.insert(
                    key.clone(),
                    format!("{} row {key} cannot be read: {e}", track.name),
                );
            }
        }
    }
    Ok((rows, errors))
}

/// Rows of a child table (patient_other_identifiers) grouped by their parent's key.
pub fn fetch_children(
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
    as_owner(child.owner, || {
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
    })
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
pub fn sync_states(
    schema: &str,
    table: pg_sys::Oid,
    keys: &[String],
) -> Result<HashMap<String, Synced>, FhirSyncError> {
    let sql = format!(
        "SELECT s.resource_key, s.fhir_id, s.identifier_system, s.identifier_value, s.deleted, s.fhir_version
           FROM unnest($2::text[]) AS k(key)
          CROSS JOIN LATERAL (
                SELECT * FROM {schema}.fhir_sync_state s
                 WHERE s.resource_table = $1::pg_catalog.regclass AND s.resource_key = k.key
                 LIMIT 1) AS s"
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
            out.insert(
                key,
                Synced {
                    fhir_id: row.get(2)?,
                    identifier,
                    deleted: row.get(5)?.unwrap_or(false),
                    version: row.get(6)?,
                },
            );
        }
        Ok(out)
    })
}

/// Runs a user mapping function on rows of `track`, one subtransaction per row so that one
/// bad row cannot fail the others. Returns per key: the resource or the function's error.
pub fn run_map_function(
    track: &Track,
    function: pg_sys::Oid,
    keys: &[String],
) -> Result<HashMap<String, Result<serde_json::Value, String>>, FhirSyncError> {
    let sql = format!(
        "SELECT s.{key}::text, (SELECT pg_catalog.to_jsonb(f) FROM (SELECT {func}(s)) f(r))->'r' FROM {table} s WHERE s.{key} = ($1::text)::{ty}",
        key = quote_identifier(&track.key_column),
        table = track.sql_name,
        ty = track.key_type,
        func = one::<String>(
            "SELECT pg_catalog.format('%I.%I', n.nspname, p.proname) FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = $1",
            &[function.into()],
        )?
        .ok_or_else(|| FhirSyncError::MapFunction(format!("mapping function of {} no longer exists", track.name)))?,
    );
    let mut out = HashMap::new();
    for key in keys {
        let r = as_owner(track.owner, || {
            crate::subxact::subtransaction(|| {
                Spi::connect(|client| {
                    let t = client.select(sql.as_str(), Some(1), &[Some(key.clone()).into()])?;
                    if t.is_empty() {
                        return Ok::<_, pgrx::spi::SpiError>(None);
                    }
                    Ok(t.first().get::<pgrx::JsonB>(2)?.map(|j| j.0))
                })
            })
        })
        .and_then(|r| r.map_err(|e| e.to_string()));
        match r {
            Ok(Some(v)) => {
                out.insert(key.clone(), Ok(v));
            }
            Ok(None) => {}
            Err(e) => {
                out.insert(key.clone(), Err(format!("mapping function failed: {e}")));
            }
        }
    }
    Ok(out)
}
