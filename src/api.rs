//! SQL functions written in Rust: the native mappers, fhir_preview, and the readers of the
//! shared counters behind the metrics views. (The rest of the SQL surface is in sql/*.sql.)

use crate::error::FhirSyncError;
use crate::mapping::{self, registry, Ctx, Refs};
use crate::metrics;
use crate::shmem::{self, WorkerState, N_BUCKETS};
use crate::source::{self, Mapper};
use crate::worker::claim::Claimed;
use crate::worker::map::{self, Action, Mode};
use crate::worker::policy::Class;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

extension_sql!(
    r#"
-- The key in whatever type the table uses: fhir_preview('patient', 1) or fhir_preview('patient', '1').
CREATE FUNCTION fhir_preview("table" regclass, key anyelement) RETURNS jsonb
LANGUAGE sql VOLATILE
AS $$ SELECT @extschema@.fhir_preview_row($1::oid, $2::text) $$;
"#,
    name = "mapper_wrappers",
    requires = [fhir_preview_row]
);

/// Maps one row (as to_jsonb renders it) of the table whose row type is `rowtype`. (0.1.0's
/// mappers called this with the row rendered in the caller's rights; kept for callers of it,
/// who pass JSON they made themselves.)
#[pg_extern(stable)]
fn fhir_map_row(mapper: &str, rowtype: pg_sys::Oid, row: JsonB) -> JsonB {
    match crate::sandbox::pinned(|| map_row(mapper, rowtype, row.0)) {
        Ok(v) => JsonB(v),
        Err(e) => e.report(),
    }
}

/// The native Patient mapper, on any row of a patient table: `SELECT fhir_patient_json(p) FROM
/// patient p`. Written in Rust, not SQL, so that no name is looked up when it runs (an overload
/// planted in the extension's schema cannot stand in); not parallel safe (the sandbox opens a
/// subtransaction).
#[pg_extern(stable)]
fn fhir_patient_json(p: pgrx::AnyElement) -> JsonB {
    map_record("patient", p)
}

/// The native Encounter mapper, on any row of a form table.
#[pg_extern(stable)]
fn fhir_encounter_json(f: pgrx::AnyElement) -> JsonB {
    map_record("encounter", f)
}

/// The native Observation mappers (blood pressure or pulse, by the row's columns).
#[pg_extern(stable)]
fn fhir_observation_json(o: pgrx::AnyElement) -> JsonB {
    map_record("observation", o)
}

/// Renders a table row and maps it. Rendering runs the casts of its column types (code of the
/// table's owner, or of the types' owners): it runs sandboxed, as `sandbox::runner_for` says —
/// never with a superuser caller's rights, never with rights the caller does not have.
fn map_record(mapper: &str, row: pgrx::AnyElement) -> JsonB {
    let rowtype = row.oid();
    // Before the datum is touched: anything but a table's row is not a composite datum, and
    // row_to_json would read it as one.
    let relid = table_of_row(rowtype);
    let run = || -> Result<Value, FhirSyncError> {
        let runner = crate::sandbox::runner_for(relation_owner(relid));
        // SAFETY: row_to_json(record) reads the row type from the composite datum itself; the
        // datum is the caller's non-null (strict) argument, of a type with a pg_class row
        // (table_of_row above), so a composite datum, valid for this call; copied out as String.
        let json = crate::sandbox::as_owner(runner, || unsafe {
            const ROW_TO_JSON: u32 = 3155;
            let d = pg_sys::OidFunctionCall1Coll(
                pg_sys::Oid::from(ROW_TO_JSON),
                pg_sys::InvalidOid,
                row.datum(),
            );
            String::from_datum(d, false)
        })
        .map_err(|error| FhirSyncError::Unreadable {
            table: relation_name(relid),
            key: "(the argument)".into(),
            error: Box::new(error),
        })?
        .unwrap_or_default();
        let value = serde_json::from_str(&json).unwrap_or(Value::Null);
        map_row(mapper, rowtype, value)
    };
    match crate::sandbox::pinned(run) {
        Ok(v) => JsonB(v),
        Err(e) => e.report(),
    }
}

fn relation_name(relid: pg_sys::Oid) -> String {
    source::one::<String>("SELECT $1::pg_catalog.regclass::text", &[relid.into()])
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// A relation's owner, or InvalidOid (for something that is not a relation).
fn relation_owner(relid: pg_sys::Oid) -> pg_sys::Oid {
    if relid == pg_sys::InvalidOid {
        return relid;
    }
    // SAFETY: pg_class's syscache by OID, read as FormData_pg_class, in the SQL function's
    // transaction.
    unsafe {
        crate::catalog::row(
            pg_sys::SysCacheIdentifier::RELOID,
            relid.into(),
            |c: &pg_sys::FormData_pg_class| c.relowner,
        )
    }
    .unwrap_or(pg_sys::InvalidOid)
}

/// The table whose row type `rowtype` is; an ERROR for any other type.
fn table_of_row(rowtype: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: an lsyscache lookup by OID in the SQL function's transaction; InvalidOid for a
    // type that has no pg_class row (not a composite).
    let relid = unsafe { pg_sys::get_typ_typrelid(rowtype) };
    if relid == pg_sys::InvalidOid {
        crate::error::raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            "fhir_sync mappers take a table row",
            "Pass the row itself, as in SELECT fhir_patient_json(p) FROM patient p.",
        );
    }
    relid
}

fn map_row(mapper: &str, rowtype: pg_sys::Oid, row: Value) -> Result<Value, FhirSyncError> {
    let relid = table_of_row(rowtype);
    let table = source::one::<String>(
        "SELECT n.nspname::text || '.' || c.relname::text FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[relid.into()],
    )?
    .unwrap_or_default();
    let key_column = source::one::<String>(
        "SELECT (SELECT a.attname::text FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a
                    ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                  WHERE i.indrelid = $1 AND i.indisprimary AND i.indnatts = 1)",
        &[relid.into()],
    )?
    .ok_or_else(|| FhirSyncError::NoPrimaryKey(table.clone()))?;
    let unknown = Ctx {
        table: &table,
        key: "?",
        identifier_base: "",
    };
    let row = mapping::row::as_row(&row, &unknown)
        .map_err(FhirSyncError::Map)?
        .clone();
    let key = match row.get(&key_column) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(FhirSyncError::NullKey(table)),
    };
    let base = crate::gucs::identifier_system();
    let ctx = Ctx {
        table: &table,
        key: &key,
        identifier_base: &base,
    };
    let refs = || -> Result<Refs, FhirSyncError> {
        Ok(Refs {
            subject: display_ref(relid, &row, &registry::PATIENT_REF)?,
            encounter: display_ref(relid, &row, &registry::ENCOUNTER_REF)?,
        })
    };
    // fhir_observation_json maps blood pressure or pulse, as the row's columns say.
    let chosen = match mapper {
        "observation" => {
            let columns: Vec<&str> = row.keys().map(String::as_str).collect();
            registry::detect_by_marker("Observation", &columns)
        }
        name => Mapper::parse(name),
    };
    let mapped = match chosen {
        Some(Mapper::Patient) => {
            mapping::patient::map(&row, &other_identifiers(relid, &key)?, &ctx)
        }
        Some(Mapper::Encounter) => mapping::encounter::map(&row, &ctx, &refs()?),
        Some(Mapper::BloodPressure) => mapping::observation::blood_pressure(&row, &ctx, &refs()?),
        Some(Mapper::Pulse) => mapping::observation::pulse(&row, &ctx, &refs()?),
        _ => {
            return Err(FhirSyncError::NoBuiltInMapper {
                table,
                resource_type: "Observation".into(),
            })
        }
    };
    mapped.map_err(FhirSyncError::Map)
}

/// Identifier rows of tables that reference the patient table by patient_id (read with the
/// caller's privileges).
fn other_identifiers(patient: pg_sys::Oid, key: &str) -> Result<Vec<mapping::Row>, FhirSyncError> {
    let children: Vec<(pg_sys::Oid, String, String)> = Spi::connect(|client| {
        let mut v = Vec::new();
        let sql = "SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), pg_catalog.format_type(a.atttypid, a.atttypmod)
                     FROM pg_catalog.pg_constraint k
                     JOIN pg_catalog.pg_class c ON c.oid = k.conrelid
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
                    WHERE k.contype = 'f' AND k.confrelid = $1 AND a.attname = 'patient_id'
                      AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute x WHERE x.attrelid = c.oid AND x.attname = 'identifier_value')
                      AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute x WHERE x.attrelid = c.oid AND x.attname = 'identifier_system')
                      AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute x WHERE x.attrelid = c.oid AND x.attname = 'name_family')";
        for r in client.select(sql, None, &[patient.into()])? {
            v.push((
                r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<String>(3)?.unwrap_or_default(),
            ));
        }
        Ok::<_, pgrx::spi::SpiError>(v)
    })?;
    let mut out = Vec::new();
    for (relid, table, ty) in children {
        let owner = relation_owner(relid);
        let runner = crate::sandbox::runner_for(owner);
        if runner != owner {
            source::require_select(relid, &table)?;
        }
        let sql = format!("SELECT pg_catalog.to_jsonb(s) FROM {table} s WHERE s.patient_id = ($1::text)::{ty} ORDER BY 1::text");
        let rows = crate::sandbox::as_owner(runner, || {
            Spi::connect(|client| {
                let mut rows = Vec::new();
                for r in client.select(sql.as_str(), None, &[Some(key.to_string()).into()])? {
                    if let Some(JsonB(Value::Object(o))) = r.get::<JsonB>(1)? {
                        rows.push(o);
                    }
                }
                Ok::<_, pgrx::spi::SpiError>(rows)
            })
        })
        .map_err(|error| FhirSyncError::Unreadable {
            table: table.clone(),
            key: format!("of patient {key}"),
            error: Box::new(error),
        })??;
        out.extend(rows);
    }
    Ok(out)
}

/// A reference for the standalone mappers: `Type/<id>` when the caller may read the sync state
/// and the referenced row synced, else a display naming the source row. The referenced table is
/// the column's foreign key target, or else the tracked table of that kind.
fn display_ref(
    relid: pg_sys::Oid,
    row: &mapping::Row,
    reference: &registry::Reference,
) -> Result<Option<Value>, FhirSyncError> {
    let (column, kind) = (reference.column, reference.resource_type);
    let key = match row.get(column) {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        _ => return Ok(None),
    };
    let unknown =
        || json!({"type": kind, "display": format!("{column} {key} (not on the FHIR server yet)")});
    let Some(schema) = source::extension_schema()? else {
        return Ok(Some(unknown()));
    };
    let readable = source::one::<bool>(
        "SELECT pg_catalog.has_table_privilege(($1 || '.fhir_sync_state')::text, 'SELECT')
            AND pg_catalog.has_table_privilege(($1 || '.fhir_tracked')::text, 'SELECT')",
        &[schema.clone().into()],
    )?
    .unwrap_or(false);
    if !readable {
        return Ok(Some(unknown()));
    }
    let id = source::one::<String>(
        &format!(
            "SELECT s.fhir_id FROM {schema}.fhir_sync_state s
              WHERE s.resource_table = {schema}.fhir_reference_target($1::pg_catalog.regclass, $2::pg_catalog.name, $3)
                AND s.resource_key = $4 AND NOT s.deleted"
        ),
        &[
            relid.into(),
            column.into(),
            reference.mapper.name().into(),
            key.clone().into(),
        ],
    )?;
    Ok(Some(match id {
        Some(id) => json!({"reference": format!("{kind}/{id}")}),
        None => unknown(),
    }))
}

/// The resource fhir_sync would send for one row of a tracked table, as it stands now.
/// Sends nothing and enqueues nothing.
#[pg_extern]
fn fhir_preview_row(table: pg_sys::Oid, key: &str) -> Option<JsonB> {
    match crate::sandbox::pinned(|| preview(table, key)) {
        Ok(v) => v.map(JsonB),
        Err(e) => e.report(),
    }
}

fn preview(table: pg_sys::Oid, key: &str) -> Result<Option<Value>, FhirSyncError> {
    let schema = source::extension_schema()?.unwrap_or_else(|| "public".into());
    let tracks = source::load_tracks(&schema)?;
    let name = || {
        source::one::<String>("SELECT $1::pg_catalog.regclass::text", &[table.into()])
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    let Some(track) = tracks.get(&table) else {
        return Err(FhirSyncError::NotTracked(name()));
    };
    // A child row previews as the resource it belongs to.
    let (root, root_key) = match (&track.parent, track.mapper) {
        (Some((parent, col, _)), Mapper::PatientIdentifier) => {
            let rows = source::fetch_rows(track, &[key.to_string()])?;
            let row = rows.get(key).ok_or_else(|| FhirSyncError::RowNotFound {
                table: track.name.clone(),
                key: key.into(),
            })?;
            let pk = match row.get(col) {
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::String(s)) => s.clone(),
                _ => return Err(FhirSyncError::NullKey(track.name.clone())),
            };
            (*parent, pk)
        }
        _ => (table, key.to_string()),
    };
    let root_track = tracks
        .get(&root)
        .ok_or_else(|| FhirSyncError::NotTracked(name()))?;
    let claimed = Claimed {
        resource_table: root,
        resource_key: root_key.clone(),
        resource_type: root_track.resource_type.clone(),
        outbox_ids: vec![],
        attempts: 0,
        identifier: None,
        age_s: 0.0,
    };
    let mut deps = Vec::new();
    let actions = map::plan(
        &schema,
        &tracks,
        std::slice::from_ref(&claimed),
        Mode::Preview,
        None,
        &[],
        &mut Vec::new(),
        &mut deps,
    )?;
    match actions.into_iter().next() {
        Some(Action::Put { body, .. }) => Ok(Some(*body)),
        Some(Action::Delete { .. }) | Some(Action::AlreadyGone) => {
            Err(FhirSyncError::RowNotFound {
                table: root_track.name.clone(),
                key: root_key,
            })
        }
        Some(Action::Fail(Class::Unmappable, e)) | Some(Action::Fail(_, e)) => {
            Err(FhirSyncError::MapFunction(e))
        }
        Some(Action::Wait(_)) | None => Ok(None),
    }
}

/// Makes the current transaction wake the workers when it commits (backfill, requeue).
#[pg_extern]
fn fhir_sync_wake() {
    crate::capture::announce_changes();
}

/// Zeroes the counters and the latency histogram.
#[pg_extern]
fn fhir_sync_reset_stats() {
    if let Some(s) = shmem::shared() {
        s.reset();
    }
}

#[allow(clippy::type_complexity)]
#[pg_extern]
fn fhir_sync_stats() -> TableIterator<
    'static,
    (
        name!(processed_total, i64),
        name!(failed_total, i64),
        name!(dead_lettered_total, i64),
        name!(calls_total, i64),
        name!(call_errors_total, i64),
        name!(latency_sum_seconds, f64),
        name!(latency_p50_seconds, Option<f64>),
        name!(latency_p90_seconds, Option<f64>),
        name!(latency_p99_seconds, Option<f64>),
        name!(paused_reason, Option<String>),
        name!(stats_reset, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    let Some(s) = shmem::shared() else {
        return TableIterator::new(std::iter::empty());
    };
    let counts: Vec<u64> = s
        .latency_buckets
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .collect();
    let errors: u64 = s
        .call_errors
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    let paused = match s.paused_reason.load(Ordering::Relaxed) {
        0 => None,
        i => Class::ALL.get(i as usize - 1).map(|c| match c {
            Class::Unreachable => "server unreachable".to_string(),
            Class::Auth => "credentials rejected (HTTP 401/403)".to_string(),
            _ => "throttled by the server".to_string(),
        }),
    };
    let row = (
        s.processed_total.load(Ordering::Relaxed) as i64,
        s.failed_total.load(Ordering::Relaxed) as i64,
        s.dead_lettered_total.load(Ordering::Relaxed) as i64,
        s.calls_total.load(Ordering::Relaxed) as i64,
        errors as i64,
        s.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        metrics::quantile(&counts, 0.5),
        metrics::quantile(&counts, 0.9),
        metrics::quantile(&counts, 0.99),
        paused.filter(|_| any_worker_paused(s)),
        to_timestamp(s.stats_reset_ms.load(Ordering::Relaxed)),
    );
    TableIterator::once(row)
}

fn any_worker_paused(s: &shmem::Shared) -> bool {
    s.workers.iter().any(|w| {
        w.pid.load(Ordering::Relaxed) != 0
            && w.state.load(Ordering::Relaxed) == WorkerState::Paused as u32
    })
}

fn to_timestamp(ms: i64) -> Option<pgrx::datum::TimestampWithTimeZone> {
    if ms <= 0 {
        return None;
    }
    pgrx::datum::TimestampWithTimeZone::try_from(
        ((ms - 946_684_800_000) * 1000) as pg_sys::TimestampTz,
    )
    .ok()
}

/// Cumulative call-latency histogram, Prometheus style (`le` = +Inf for the last row).
#[pg_extern]
fn fhir_sync_latency_histogram() -> TableIterator<'static, (name!(le, f64), name!(count, i64))> {
    let Some(s) = shmem::shared() else {
        return TableIterator::new(std::iter::empty());
    };
    let mut acc = 0i64;
    let rows: Vec<(f64, i64)> = (0..N_BUCKETS)
        .map(|i| {
            acc += s.latency_buckets[i].load(Ordering::Relaxed) as i64;
            (
                shmem::LATENCY_BOUNDS
                    .get(i)
                    .copied()
                    .unwrap_or(f64::INFINITY),
                acc,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Failed calls by error class.
#[pg_extern]
fn fhir_sync_call_errors() -> TableIterator<'static, (name!(error_class, String), name!(count, i64))>
{
    let Some(s) = shmem::shared() else {
        return TableIterator::new(std::iter::empty());
    };
    let rows: Vec<(String, i64)> = Class::ALL
        .iter()
        .map(|c| {
            (
                c.name().to_string(),
                s.call_errors[c.index()].load(Ordering::Relaxed) as i64,
            )
        })
        .collect();
    TableIterator::new(rows)
}

#[allow(clippy::type_complexity)]
#[pg_extern]
fn fhir_sync_worker_slots() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(database_oid, pg_sys::Oid),
        name!(state, String),
        name!(current_batch, i64),
        name!(started_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_success_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_error_class, Option<String>),
        name!(last_error_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(cycles, i64),
    ),
> {
    let Some(s) = shmem::shared() else {
        return TableIterator::new(std::iter::empty());
    };
    let rows: Vec<_> = s
        .workers
        .iter()
        .filter(|w| w.pid.load(Ordering::Relaxed) != 0)
        .map(|w| {
            let class = w.last_error_class.load(Ordering::Relaxed);
            (
                w.pid.load(Ordering::Relaxed),
                pg_sys::Oid::from(w.db_oid.load(Ordering::Relaxed)),
                WorkerState::name(w.state.load(Ordering::Relaxed)).to_string(),
                w.batch.load(Ordering::Relaxed) as i64,
                to_timestamp(w.started_ms.load(Ordering::Relaxed)),
                to_timestamp(w.last_success_ms.load(Ordering::Relaxed)),
                (class > 0)
                    .then(|| {
                        Class::ALL
                            .get(class as usize - 1)
                            .map(|c| c.name().to_string())
                    })
                    .flatten(),
                to_timestamp(w.last_error_ms.load(Ordering::Relaxed)),
                w.cycles.load(Ordering::Relaxed) as i64,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// EXPLAIN (ANALYZE, BUFFERS) of the worker's claim statements, run in a subtransaction that is
/// rolled back (nothing stays leased). For checking that claiming stays cheap with a large
/// backlog.
#[pg_extern]
fn fhir_sync_explain_claim(
    batch: default!(i32, 200),
) -> TableIterator<'static, (name!(plan, String),)> {
    crate::sandbox::pinned(|| explain_claim(batch))
}

fn explain_claim(batch: i32) -> TableIterator<'static, (name!(plan, String),)> {
    let schema = match source::extension_schema() {
        Ok(Some(s)) => s,
        _ => return TableIterator::new(std::iter::empty()),
    };
    let mut plans = Vec::new();
    let run = crate::subxact::rolled_back(|| {
        crate::worker::apply_session_settings(true)?;
        crate::worker::claim::claim_with(
            &schema,
            batch as i64,
            1000,
            &Default::default(),
            &mut Default::default(),
            None,
            Some(&mut plans),
        )
    });
    match run.map_err(FhirSyncError::from).and_then(|claimed| claimed) {
        Ok(_) => TableIterator::new(plans.into_iter().map(|p| (p,)).collect::<Vec<_>>()),
        Err(e) => e.report(),
    }
}

/// The keys fhir_backfill enqueues for a tracked table: per row (its key, and a patient's own
/// identifier), or per parent for identifier tables. Read as the table's owner, sandboxed, with
/// the caller's right to read the table checked first.
#[pg_extern]
#[allow(clippy::type_complexity)]
fn fhir_backfill_keys(
    table: pg_sys::Oid,
) -> TableIterator<
    'static,
    (
        name!(record_id, Option<String>),
        name!(resource_key, Option<String>),
        name!(identifier_system, Option<String>),
        name!(identifier_value, Option<String>),
    ),
> {
    match crate::sandbox::pinned(|| backfill_keys(table)) {
        Ok(rows) => TableIterator::new(rows),
        Err(e) => e.report(),
    }
}

type KeyRow = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn backfill_keys(table: pg_sys::Oid) -> Result<Vec<KeyRow>, FhirSyncError> {
    let schema = source::extension_schema()?.unwrap_or_else(|| "public".into());
    let tracks = source::load_tracks(&schema)?;
    let Some(track) = tracks.get(&table) else {
        return Err(FhirSyncError::NotTracked(format!("{table:?}")));
    };
    let key = pgrx::spi::quote_identifier(&track.key_column);
    let sql = match &track.parent {
        Some((_, col, _)) => {
            let col = pgrx::spi::quote_identifier(col);
            format!(
                "SELECT pg_catalog.min(s.{key}::text), s.{col}::text, NULL::text, NULL::text FROM {t} s
                  WHERE s.{col} IS NOT NULL GROUP BY s.{col}",
                t = track.sql_name
            )
        }
        None if track.mapper == Mapper::Patient => format!(
            "SELECT s.{key}::text, s.{key}::text, s.identifier_system::text, s.identifier_value::text
               FROM {t} s ORDER BY s.{key}",
            t = track.sql_name
        ),
        None => format!(
            "SELECT s.{key}::text, s.{key}::text, NULL::text, NULL::text FROM {t} s ORDER BY s.{key}",
            t = track.sql_name
        ),
    };
    let runner = crate::sandbox::runner_for(track.owner);
    if runner != track.owner {
        source::require_select(track.relid, &track.name)?;
    }
    crate::sandbox::as_owner(runner, || {
        Spi::connect(|client| {
            let mut out = Vec::new();
            for r in client.select(sql.as_str(), None, &[])? {
                out.push((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?));
            }
            Ok::<_, pgrx::spi::SpiError>(out)
        })
    })
    .map_err(|error| FhirSyncError::Unreadable {
        table: track.name.clone(),
        key: "(a key, while backfilling)".into(),
        error: Box::new(error),
    })?
    .map_err(Into::into)
}

/// Every mapper name fhir_tracked.mapper may hold (the registry's, in fhir_sync_core).
#[pg_extern(immutable, parallel_safe)]
fn fhir_mapper_names() -> Vec<&'static str> {
    registry::names()
}

/// The built-in mapper `fhir_track` picks for a table of `resource_type` with these columns,
/// or NULL when none fits.
#[pg_extern(immutable, parallel_safe)]
fn fhir_builtin_mapper(resource_type: &str, columns: Vec<String>) -> Option<&'static str> {
    registry::detect(resource_type, &columns).map(Mapper::name)
}

/// The public JWK Set to register with the EHR for SMART Backend Services: the signing key
/// (fhir_sync.smart_key_file) first, then the one being rotated out
/// (fhir_sync.smart_previous_key_file). Public halves only. Read from the files as the worker
/// reads them, so what it prints is what the worker signs with after the next reload.
#[pg_extern(volatile)]
fn fhir_sync_jwks() -> JsonB {
    use crate::error::raise;
    let hint = "Set fhir_sync.smart_key_file to a PEM private key (RSA or EC P-384) private to the PostgreSQL OS user, and reload.";
    let current = crate::gucs::smart_signing_key().unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
            &format!("cannot read the SMART signing key: {e}"),
            hint,
        )
    });
    let previous = crate::gucs::smart_previous_key().unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
            &format!("cannot read the SMART key being rotated out: {e}"),
            "Fix or clear fhir_sync.smart_previous_key_file.",
        )
    });
    let Some(current) = current else {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "no SMART signing key is configured",
            hint,
        )
    };
    let keys: Vec<&fhir_sync_core::smart::SigningKey> =
        std::iter::once(&current).chain(previous.as_ref()).collect();
    JsonB(fhir_sync_core::smart::jwks(&keys))
}

/// What the server's CapabilityStatement says and what the workers make of it (JSON), as the
/// last worker to read it published it; NULL until one has. Behind the fhir_sync_server view.
#[pg_extern(volatile)]
fn fhir_sync_server_capabilities() -> Option<JsonB> {
    let text = shmem::shared()?.server.read()?;
    serde_json::from_str(&text).ok().map(JsonB)
}
