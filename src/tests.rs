// In-database tests (`cargo pgrx test`). Each runs in a transaction that is rolled back, so
// they test capture, mapping and the SQL surface; delivery is tested end to end in tests/e2e.

use pgrx::prelude::*;
use serde_json::Value;

const TABLES: &str = include_str!("../tests/fixtures/health_tables.sql");
const ROWS: &str = include_str!("../tests/fixtures/sample_rows.sql");

/// Creates, tracks and fills the health tables; returns the last outbox id before the test's
/// own changes (identity values are not rolled back between tests).
fn setup() -> i64 {
    Spi::run(TABLES).unwrap();
    Spi::run(
        "SELECT fhir_track('patient', 'Patient'), fhir_track('patient_other_identifiers', 'Patient'),
                fhir_track('form', 'Encounter'), fhir_track('blood_pressure', 'Observation'),
                fhir_track('pulse', 'Observation')",
    )
    .unwrap();
    Spi::run(ROWS).unwrap();
    count("SELECT coalesce(max(id), 0) FROM fhir_outbox")
}

fn json(sql: &str) -> Value {
    Spi::get_one::<pgrx::JsonB>(sql).unwrap().expect("a row").0
}

fn json_with(sql: &str, arg: i64) -> Value {
    Spi::get_one_with_args::<pgrx::JsonB>(sql, &[arg.into()]).unwrap().expect("a row").0
}

fn count(sql: &str) -> i64 {
    Spi::get_one::<i64>(sql).unwrap().unwrap_or(0)
}

/// The error `sql` raises, as "message | hint"; empty when it succeeds.
fn error_of(sql: &str) -> String {
    PgTryBuilder::new(|| Spi::run(sql).map(|_| String::new()).unwrap_or_default())
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
                format!("{} | {}", r.message(), r.hint().unwrap_or_default())
            }
            _ => "panic".into(),
        })
        .execute()
}

/// Row reads run through plans kept for the backend's lifetime (plans.rs); a tracked table that
/// changes shape afterwards must be read in its new shape, never through the old plan.
#[pg_test]
fn a_tracked_table_that_changes_shape_is_read_in_its_new_shape() {
    setup();
    assert_eq!(json("SELECT fhir_preview('patient', 1)")["gender"], "female");
    Spi::run("ALTER TABLE patient RENAME COLUMN gender TO gender_before").unwrap();
    Spi::run("ALTER TABLE patient ADD COLUMN gender text DEFAULT 'male'").unwrap();
    assert_eq!(json("SELECT fhir_preview('patient', 1)")["gender"], "male");
    Spi::run("ALTER TABLE patient DROP COLUMN gender").unwrap();
    assert!(json("SELECT fhir_preview('patient', 1)").get("gender").is_none());
}

#[pg_test]
fn capture_writes_one_outbox_row_per_change() {
    setup();
    assert_eq!(count("SELECT count(*) FROM fhir_outbox"), 6);
    let ops = json(
        "SELECT jsonb_agg(jsonb_build_array(table_name, operation, resource_type, resource_table::text, resource_key) ORDER BY id) FROM fhir_outbox",
    );
    assert_eq!(ops[0], serde_json::json!(["public.patient", "I", "Patient", "patient", "1"]));
    // The identifier row is a change of its parent Patient.
    assert_eq!(ops[2], serde_json::json!(["public.patient_other_identifiers", "U", "Patient", "patient", "1"]));
    assert_eq!(ops[5], serde_json::json!(["public.pulse", "I", "Observation", "pulse", "1"]));
}

/// The trigger writes outbox rows without SQL (outbox_write.rs): what the table's defaults
/// would have given must be there, and the partial indexes the worker claims through must
/// hold the row.
#[pg_test]
fn a_captured_row_has_its_defaults_and_is_found_through_the_indexes() {
    let base = setup();
    Spi::run("INSERT INTO patient (identifier_system, identifier_value, name_family) VALUES ('urn:x', 'defaults', 'X')")
        .unwrap();
    let row = json_with(
        "SELECT jsonb_build_object('txid_is_ours', txid = txid_current(), 'recent', created_at > now() - interval '1 minute',
                'processed', processed, 'attempts', attempts, 'payload', payload_json, 'next', next_retry_at,
                'identity_follows', id > $1)
           FROM fhir_outbox WHERE id > $1",
        base,
    );
    assert_eq!(
        row,
        serde_json::json!({"txid_is_ours": true, "recent": true, "processed": false, "attempts": 0,
                           "payload": null, "next": null, "identity_follows": true})
    );
    Spi::run("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off").unwrap();
    let by_resource = count(&format!(
        "SELECT count(*) FROM fhir_outbox WHERE resource_table = 'patient'::regclass
            AND resource_key = (SELECT id::text FROM patient WHERE identifier_value = 'defaults') AND NOT processed AND id > {base}"
    ));
    let in_claim_order = count(&format!(
        "SELECT count(*) FROM (SELECT id FROM fhir_outbox WHERE NOT processed ORDER BY next_retry_at NULLS FIRST, id) p WHERE id > {base}"
    ));
    assert_eq!((by_resource, in_claim_order), (1, 1));
}

#[pg_test]
fn capture_payload_keeps_a_jsonb_copy_of_the_row() {
    let base = setup();
    Spi::run("SET LOCAL fhir_sync.capture_payload = on").unwrap();
    Spi::run("INSERT INTO patient (identifier_system, identifier_value, name_family) VALUES ('urn:x', 'payload', 'O''Brien \"Jr\"')")
        .unwrap();
    let payload = json_with("SELECT payload_json FROM fhir_outbox WHERE id > $1", base);
    assert_eq!(payload["name_family"], "O'Brien \"Jr\"");
    assert_eq!(payload["identifier_value"], "payload");
}

/// The columns the trigger writes are found by name once per backend; a DBA's ALTER TABLE of
/// the outbox must not make it write into the wrong columns.
#[pg_test]
fn capture_follows_an_altered_outbox() {
    let base = setup();
    Spi::run("ALTER TABLE fhir_outbox ADD COLUMN dba_note text").unwrap();
    Spi::run("INSERT INTO pulse (patient_id, rate, measurement_time) VALUES (1, 61, now())").unwrap();
    Spi::run("ALTER TABLE fhir_outbox DROP COLUMN dba_note").unwrap();
    Spi::run("INSERT INTO pulse (patient_id, rate, measurement_time) VALUES (1, 62, now())").unwrap();
    let rows = json_with(
        "SELECT jsonb_agg(jsonb_build_array(table_name, operation, resource_type, resource_table::text) ORDER BY id)
           FROM fhir_outbox WHERE id > $1",
        base,
    );
    let one = serde_json::json!(["public.pulse", "I", "Observation", "pulse"]);
    assert_eq!(rows, serde_json::json!([one, one]));
}

/// A DBA may hang triggers of their own on the outbox (an audit, a NOTIFY for a dashboard): the
/// capture's direct insert must fire them as an INSERT would.
#[pg_test]
fn triggers_a_dba_adds_to_the_outbox_fire_on_capture() {
    let base = setup();
    Spi::run(
        "CREATE TABLE outbox_audit (outbox_id bigint, op text, fired text);
         CREATE FUNCTION audit_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO outbox_audit VALUES (NEW.id, NEW.operation, TG_WHEN); RETURN NEW; END $$;
         CREATE TRIGGER audit_before BEFORE INSERT ON fhir_outbox FOR EACH ROW EXECUTE FUNCTION audit_outbox();
         CREATE TRIGGER audit_after AFTER INSERT ON fhir_outbox FOR EACH ROW EXECUTE FUNCTION audit_outbox();",
    )
    .unwrap();
    Spi::run("INSERT INTO pulse (patient_id, rate, measurement_time) VALUES (1, 63, now())").unwrap();
    let fired = json_with(
        "SELECT jsonb_agg(jsonb_build_array(a.op, a.fired) ORDER BY a.fired DESC)
           FROM outbox_audit a JOIN fhir_outbox o ON o.id = a.outbox_id WHERE o.id > $1",
        base,
    );
    assert_eq!(fired, serde_json::json!([["I", "BEFORE"], ["I", "AFTER"]]));
}

/// The outbox insert goes through the executor's constraint checks: a CHECK a DBA adds refuses the
/// writer's change with PostgreSQL's own message. (On PostgreSQL 13 that report reads the row's
/// range-table entry, which outbox_write builds for it.)
#[pg_test]
fn a_check_a_dba_adds_to_the_outbox_is_enforced_on_capture() {
    setup();
    Spi::run("ALTER TABLE fhir_outbox ADD CONSTRAINT no_pulse CHECK (table_name <> 'public.pulse') NOT VALID")
        .unwrap();
    let err = error_of("INSERT INTO pulse (patient_id, rate, measurement_time) VALUES (1, 63, now())");
    assert!(err.contains("violates check constraint \"no_pulse\""), "{err}");
}

#[pg_test]
fn update_and_delete_are_captured_with_the_identifier() {
    let base = setup();
    Spi::run("UPDATE patient SET name_family = 'Okafor-Smith' WHERE id = 1").unwrap();
    Spi::run("DELETE FROM pulse WHERE id = 1").unwrap();
    Spi::run("DELETE FROM patient WHERE id = 2").unwrap();
    let last = json_with(
        "SELECT jsonb_agg(jsonb_build_array(table_name, operation, record_id, identifier_value) ORDER BY id) FROM fhir_outbox WHERE id > $1",
        base,
    );
    assert_eq!(last[0], serde_json::json!(["public.patient", "U", "1", "MRN-0001"]));
    assert_eq!(last[1], serde_json::json!(["public.pulse", "D", "1", null]));
    assert_eq!(last[2], serde_json::json!(["public.patient", "D", "2", "MRN-0002"]));
}

#[pg_test]
fn a_child_row_moving_between_patients_changes_both() {
    let base = setup();
    Spi::run("UPDATE patient_other_identifiers SET patient_id = 2 WHERE id = 1").unwrap();
    let keys = json_with("SELECT jsonb_agg(resource_key ORDER BY id) FROM fhir_outbox WHERE id > $1", base);
    assert_eq!(keys, serde_json::json!(["1", "2"]));
}

#[pg_test]
fn a_rolled_back_change_leaves_nothing() {
    let base = setup();
    Spi::run(
        "DO $$ BEGIN
             INSERT INTO patient (identifier_system, identifier_value, name_family) VALUES ('urn:x', 'rolled-back', 'X');
             RAISE EXCEPTION 'roll it back';
         EXCEPTION WHEN raise_exception THEN NULL;
         END $$",
    )
    .unwrap();
    assert_eq!(count(&format!("SELECT count(*) FROM fhir_outbox WHERE id > {base}")), 0);
}

#[pg_test]
fn untrack_stops_capture() {
    setup();
    Spi::run("SELECT fhir_untrack('pulse')").unwrap();
    Spi::run("INSERT INTO pulse (patient_id, rate, measurement_time) VALUES (1, 60, now())").unwrap();
    assert_eq!(count("SELECT count(*) FROM fhir_outbox WHERE table_name = 'public.pulse'"), 1);
    assert_eq!(count("SELECT count(*) FROM fhir_tracked WHERE table_name = 'pulse'::regclass"), 0);
}

#[pg_test]
fn the_capture_trigger_refuses_to_fire_before_a_row() {
    setup();
    // A BEFORE trigger returning NULL would skip the writer's row while capturing it.
    Spi::run(
        "CREATE TRIGGER early BEFORE INSERT ON pulse FOR EACH ROW
         EXECUTE FUNCTION fhir_capture('public', 'Observation', 'id', '', '', 'pulse')",
    )
    .unwrap();
    let err = error_of("INSERT INTO pulse (patient_id, rate, measurement_time) VALUES (1, 61, now())");
    assert!(err.contains("fhir_capture must fire AFTER each row"), "{err}");
    assert!(err.contains("fhir_track"), "{err}");
}

#[pg_test]
fn track_refuses_a_table_without_a_mapping() {
    Spi::run("CREATE TABLE misc (id int PRIMARY KEY, x text)").unwrap();
    let err = error_of("SELECT fhir_track('misc', 'Observation')");
    assert!(err.contains("has no built-in Observation mapping"), "{err}");
    assert!(err.contains("map_function"), "{err}");
}

#[pg_test]
fn patient_json_is_fhir_r4_with_all_identifiers() {
    setup();
    let p = json("SELECT fhir_patient_json(p) FROM patient p WHERE id = 1");
    assert_eq!(p["resourceType"], "Patient");
    assert_eq!(p["identifier"][0]["system"], "http://hospital.example.org/mrn");
    assert_eq!(p["identifier"][0]["value"], "MRN-0001");
    assert_eq!(p["identifier"][1]["system"], "http://hl7.org/fhir/sid/us-ssn");
    assert_eq!(p["gender"], "female");
    assert_eq!(p["birthDate"], "1980-04-12");
    assert_eq!(p["deceasedBoolean"], false);
    assert_eq!(p["name"][0]["family"], "Okafor");
    assert_eq!(p["name"][0]["given"], serde_json::json!(["Ada", "Ngozi"]));
    assert_eq!(p["address"][0]["postalCode"], "03801");
    // Preview of the tracked row is the same resource.
    assert_eq!(json("SELECT fhir_preview('patient', 1)"), p);
    // …and so is the preview of its identifier row, which belongs to the same Patient.
    assert_eq!(json("SELECT fhir_preview('patient_other_identifiers', 1)"), p);
}

#[pg_test]
fn observations_carry_loinc_codes_and_ucum_units() {
    setup();
    let bp = json("SELECT fhir_observation_json(b) FROM blood_pressure b WHERE id = 1");
    assert_eq!(bp["code"]["coding"][0]["code"], "85354-9");
    assert_eq!(bp["category"][0]["coding"][0]["code"], "vital-signs");
    assert_eq!(bp["component"][0]["code"]["coding"][0]["code"], "8480-6");
    assert_eq!(bp["component"][0]["valueQuantity"]["value"], 128);
    assert_eq!(bp["component"][1]["code"]["coding"][0]["code"], "8462-4");
    assert_eq!(bp["component"][1]["valueQuantity"]["code"], "mm[Hg]");
    assert_eq!(bp["identifier"][0]["system"], "urn:fhir-sync/public.blood_pressure");
    let pulse = json("SELECT fhir_observation_json(p) FROM pulse p WHERE id = 1");
    assert_eq!(pulse["code"]["coding"][0]["code"], "8867-4");
    assert_eq!(pulse["valueQuantity"]["unit"], "/min");
    let enc = json("SELECT fhir_encounter_json(f) FROM form f WHERE id = 1");
    assert_eq!(enc["resourceType"], "Encounter");
    assert_eq!(enc["status"], "finished");
    assert_eq!(enc["period"]["start"], "2024-03-01T09:30:00+00:00");
}

#[pg_test]
fn a_bad_row_gets_an_error_naming_row_and_field() {
    setup();
    Spi::run("UPDATE patient SET gender = 'banana' WHERE id = 2").unwrap();
    let err = error_of("SELECT fhir_patient_json(p) FROM patient p WHERE id = 2");
    assert!(err.contains("public.patient row 2"), "{err}");
    assert!(err.contains("\"gender\""), "{err}");
    assert!(!err.contains("banana"), "the message must not echo the value: {err}");
}

#[pg_test]
fn backfill_enqueues_every_row_and_children_once_per_parent() {
    Spi::run(TABLES).unwrap();
    Spi::run(ROWS).unwrap();
    Spi::run("INSERT INTO patient_other_identifiers (patient_id, identifier_system, identifier_value) VALUES (1, 'urn:a', 'x')").unwrap();
    Spi::run("SELECT fhir_track('patient', 'Patient'), fhir_track('patient_other_identifiers', 'Patient')").unwrap();
    assert_eq!(count("SELECT count(*) FROM fhir_outbox"), 0);
    assert_eq!(count("SELECT fhir_backfill('patient')"), 2);
    assert_eq!(count("SELECT fhir_backfill('patient_other_identifiers')"), 1);
    assert_eq!(count("SELECT count(*) FROM fhir_outbox WHERE resource_table = 'patient'::regclass AND resource_key = '1'"), 2);
}

#[pg_test]
fn requeue_moves_dead_letters_back_and_keeps_the_record() {
    setup();
    Spi::run(
        "INSERT INTO fhir_dlq (outbox_ids, table_name, record_id, operation, resource_type, resource_table, resource_key, error_class, error, http_status)
         VALUES ('{1}', 'public.patient', '1', 'U', 'Patient', 'patient', '1', 'rejected', 'HTTP 422', 422),
                ('{2}', 'public.pulse', '1', 'U', 'Observation', 'pulse', '1', 'transient', 'HTTP 503', 503)",
    )
    .unwrap();
    assert_eq!(count("SELECT fhir_requeue_dlq(http_status => 422)"), 1);
    assert_eq!(count("SELECT count(*) FROM fhir_dlq WHERE requeued AND requeued_outbox_id IS NOT NULL"), 1);
    assert_eq!(count("SELECT fhir_requeue_dlq()"), 1);
    assert_eq!(count("SELECT fhir_requeue_dlq()"), 0);
    assert_eq!(count("SELECT count(*) FROM fhir_dlq"), 2);
    assert_eq!(count("SELECT count(*) FROM fhir_outbox o JOIN fhir_dlq d ON d.requeued_outbox_id = o.id WHERE o.attempts = 0 AND NOT o.processed"), 2);
}

#[pg_test]
fn cleanup_deletes_old_history_only() {
    let last = setup();
    // Three changes delivered (moved to the history as the settle moves them): two 40 days ago, one yesterday.
    Spi::run(&format!(
        "WITH moved AS (DELETE FROM fhir_outbox WHERE id <= {last} - 3 RETURNING *)
         INSERT INTO fhir_outbox_delivered (id, txid, table_name, record_id, operation, resource_type, resource_table,
                resource_key, created_at, processed_at, attempts)
         SELECT id, txid, table_name, record_id, operation, resource_type, resource_table, resource_key, created_at,
                now() - CASE WHEN id = {last} - 3 THEN interval '1 day' ELSE interval '40 days' END, attempts FROM moved"
    ))
    .unwrap();
    Spi::run(
        "INSERT INTO fhir_dlq (outbox_ids, table_name, record_id, operation, resource_type, resource_table, resource_key, error_class, error, last_failed_at)
         VALUES ('{9}', 'public.pulse', '1', 'U', 'Observation', 'pulse', '1', 'rejected', 'HTTP 422', now() - interval '100 days'),
                ('{8}', 'public.pulse', '1', 'U', 'Observation', 'pulse', '1', 'rejected', 'HTTP 422', now() - interval '40 days')",
    )
    .unwrap();
    let r = json("SELECT to_jsonb(c) FROM fhir_cleanup_old(30) c");
    assert_eq!(r, serde_json::json!({"outbox_deleted": 2, "dlq_deleted": 1}));
    assert_eq!(count("SELECT count(*) FROM fhir_outbox"), 3);
    assert_eq!(count("SELECT count(*) FROM fhir_outbox_delivered"), 1);
}

#[pg_test]
fn ordinary_roles_see_nothing_but_can_still_capture() {
    setup();
    Spi::run("CREATE ROLE fhir_test_clerk; GRANT ALL ON patient, patient_other_identifiers TO fhir_test_clerk; GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO fhir_test_clerk").unwrap();
    Spi::run("SET LOCAL ROLE fhir_test_clerk").unwrap();
    // Capture works for a role that may write the tracked table…
    Spi::run("INSERT INTO patient (identifier_system, identifier_value, name_family) VALUES ('urn:x', 'clerk-1', 'Clerk')").unwrap();
    // …but the outbox, the DLQ and the admin functions are out of reach.
    for sql in [
        "SELECT count(*) FROM fhir_dlq",
        "SELECT count(*) FROM fhir_outbox",
        "INSERT INTO fhir_outbox (table_name, record_id, operation, resource_type, resource_table, resource_key) VALUES ('x', '1', 'I', 'Patient', 'patient', '1')",
        "SELECT fhir_requeue_dlq()",
        "SELECT fhir_cleanup_old(1)",
        "SELECT fhir_track('form', 'Encounter')",
        "SELECT fhir_preview('patient', 1)",
    ] {
        let denied = error_of(sql).contains("permission denied");
        assert!(denied, "expected permission denied for: {sql}");
    }
    Spi::run("RESET ROLE").unwrap();
    assert_eq!(count("SELECT count(*) FROM fhir_outbox WHERE identifier_value = 'clerk-1'"), 1);
}

#[pg_test]
fn the_trigger_ignores_a_planted_search_path() {
    setup();
    // A schema ahead on the path with look-alikes of what the trigger might resolve.
    Spi::run(
        "CREATE SCHEMA evil;
         CREATE TABLE evil.fhir_outbox (LIKE fhir_outbox);
         CREATE FUNCTION evil.txid_current() RETURNS bigint LANGUAGE sql AS 'SELECT -1::bigint';
         CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS $$SELECT '2000-01-01'::timestamptz$$;
         SET LOCAL search_path = evil, public, pg_catalog;",
    )
    .unwrap();
    Spi::run("INSERT INTO public.pulse (patient_id, rate, measurement_time) VALUES (1, 61, now())").unwrap();
    Spi::run("RESET search_path").unwrap();
    assert_eq!(count("SELECT count(*) FROM evil.fhir_outbox"), 0);
    assert_eq!(count("SELECT count(*) FROM public.fhir_outbox WHERE table_name = 'public.pulse' AND txid > 0 AND created_at > '2001-01-01'"), 2);
}

#[pg_test]
fn a_claim_made_while_resources_are_in_flight_passes_them_over() {
    setup();
    let patient = Spi::get_one::<pg_sys::Oid>("SELECT 'patient'::regclass::oid").unwrap().unwrap();
    // Patient 1 is out on the wire (its first batch); a newer change of it is pending.
    let in_flight: crate::worker::claim::ResourcesInFlight = [(patient, "1".to_string())].into();
    let claimed = crate::worker::claim::claim("public", 100, 60_000, &in_flight, &mut Default::default(), None).unwrap();
    assert!(!claimed.is_empty());
    assert!(
        claimed.iter().all(|c| !(c.resource_table == patient && c.resource_key == "1")),
        "a resource in flight was claimed again"
    );
    // Every other pending change was claimed with its resource, and the claim wrote no row.
    let ids: usize = claimed.iter().map(|c| c.outbox_ids.len()).sum();
    assert_eq!(ids as i64, count("SELECT count(*) FROM fhir_outbox WHERE NOT processed AND NOT (resource_key = '1' AND resource_table = 'patient'::regclass)"));
    assert_eq!(count("SELECT count(*) FROM fhir_outbox WHERE locked_by IS NOT NULL OR lock_expires_at IS NOT NULL"), 0);
}

/// The sandbox undoes what owners' code sets, keeps its errors with their SQLSTATE, refuses a role
/// change inside it, and gives the caller its own identity and settings back.
#[pg_test]
fn owners_code_in_the_sandbox_leaves_nothing_behind() {
    Spi::run("CREATE ROLE fhir_sync_test_owner").unwrap();
    let owner = Spi::get_one::<pg_sys::Oid>("SELECT 'fhir_sync_test_owner'::regrole::oid")
        .unwrap()
        .unwrap();
    let before = Spi::get_one::<String>("SHOW search_path").unwrap().unwrap();
    let inside = crate::sandbox::as_owner(owner, || {
        Spi::run("SELECT set_config('search_path', 'evil, pg_catalog', false)").unwrap();
        Spi::run("SELECT set_config('work_mem', '77MB', false)").unwrap();
        (
            Spi::get_one::<String>("SELECT current_user::text").unwrap().unwrap(),
            Spi::get_one::<String>("SHOW search_path").unwrap().unwrap(),
        )
    })
    .expect("runs");
    assert_eq!(inside.0, "fhir_sync_test_owner");
    assert_eq!(inside.1, "evil, pg_catalog", "the owner's code may set what it likes");
    assert_eq!(Spi::get_one::<String>("SHOW search_path").unwrap().unwrap(), before);
    assert_ne!(Spi::get_one::<String>("SHOW work_mem").unwrap().unwrap(), "77MB");
    assert_ne!(
        Spi::get_one::<String>("SELECT current_user::text").unwrap().unwrap(),
        "fhir_sync_test_owner"
    );
    // An error comes back typed, and a role change is refused (security-restricted operation).
    let err = crate::sandbox::as_owner(owner, || Spi::run("SET ROLE NONE"))
        .map(|r| r.map_err(|e| e.to_string()))
        .expect_err("SET ROLE is refused in the sandbox");
    assert_eq!(err.sqlstate(), "42501", "{err}");
    let err = crate::sandbox::as_owner(owner, || Spi::run("SELECT 1/0")).expect_err("raises");
    assert_eq!(err.sqlstate(), "22012");
    assert!(err.log_form().starts_with("SQLSTATE 22012"), "{}", err.log_form());
    // Temporary objects are refused too.
    let err = crate::sandbox::as_owner(owner, || Spi::run("CREATE TEMP TABLE t (x int)"))
        .expect_err("refused");
    assert_eq!(err.sqlstate(), "42501");
}

/// fhir_sync's row fetches keep one generic plan, except for a partitioned table (a generic plan
/// of `key = ANY ($1)` prunes no partition); the setting ends with the sandbox.
#[pg_test]
fn row_fetches_use_a_generic_plan_but_not_on_a_partitioned_table() {
    Spi::run("CREATE TABLE fhir_sync_test_plain (id int PRIMARY KEY)").unwrap();
    Spi::run("CREATE TABLE fhir_sync_test_parted (id int PRIMARY KEY) PARTITION BY HASH (id)").unwrap();
    let oid = |t: &str| {
        Spi::get_one::<pg_sys::Oid>(&format!("SELECT '{t}'::regclass::oid"))
            .unwrap()
            .unwrap()
    };
    let mode_inside = |relid| {
        crate::sandbox::as_owner(pg_sys::InvalidOid, || {
            crate::sandbox::generic_plans_for(relid);
            Spi::get_one::<String>("SHOW plan_cache_mode").unwrap().unwrap()
        })
        .expect("runs")
    };
    assert_eq!(mode_inside(oid("fhir_sync_test_plain")), "force_generic_plan");
    assert_eq!(mode_inside(oid("fhir_sync_test_parted")), "auto");
    assert_eq!(Spi::get_one::<String>("SHOW plan_cache_mode").unwrap().unwrap(), "auto");
}

/// fhir_sync's own statements in a user's session run under the pinned search_path, and the
/// caller's comes back.
#[pg_test]
fn pinned_statements_ignore_the_callers_search_path() {
    Spi::run("CREATE SCHEMA fhir_sync_test_evil").unwrap();
    Spi::run("SET search_path = fhir_sync_test_evil, public").unwrap();
    let inside = crate::sandbox::pinned(|| Spi::get_one::<String>("SHOW search_path").unwrap());
    assert_eq!(inside.as_deref(), Some("pg_catalog, pg_temp"));
    assert_eq!(
        Spi::get_one::<String>("SHOW search_path").unwrap().as_deref(),
        Some("fhir_sync_test_evil, public")
    );
    Spi::run("RESET search_path").unwrap();
}

/// pg_settings tells a DBA what each setting does, and enum settings read as they are written.
#[pg_test]
fn every_setting_is_described_and_enums_show_their_sql_names() {
    let undescribed = count(
        "SELECT count(*) FROM pg_settings WHERE name LIKE 'fhir\\_sync.%'
            AND (coalesce(short_desc, '') = '' OR coalesce(extra_desc, '') = '')",
    );
    assert_eq!(undescribed, 0);
    assert!(count("SELECT count(*) FROM pg_settings WHERE name LIKE 'fhir\\_sync.%'") >= 25);
    assert_eq!(
        Spi::get_one::<String>("SHOW fhir_sync.auth").unwrap().as_deref(),
        Some("none")
    );
    assert_eq!(
        Spi::get_one::<String>("SHOW fhir_sync.bundle_type").unwrap().as_deref(),
        Some("batch")
    );
}

/// The identity guard's lookups read fhir_sync_state through its hashed indexes (a lookup that
/// spelled the index's expression another way would read the whole table, for every batch of
/// first writes, under their advisory locks), and match the text exactly: a system or value
/// that contains '|' is another identifier.
#[pg_test]
fn identity_lookups_use_the_hashed_indexes_and_match_the_text_exactly() {
    use fhir_sync_core::identity::Identity;
    setup();
    let schema = crate::source::extension_schema().unwrap().expect("installed");
    Spi::run(
        "INSERT INTO fhir_sync_state (resource_table, resource_key, resource_type, fhir_id, identifier_system, identifier_value)
         VALUES ('patient', '900', 'Patient', 'p900', 'urn:a|b', 'c'),
                ('patient', '901', 'Patient', NULL, 'urn:a', 'b|c')",
    )
    .unwrap();
    let patient = Spi::get_one::<pg_sys::Oid>("SELECT 'patient'::regclass::oid")
        .unwrap()
        .unwrap()
        .to_u32();
    let want = |system: &str, value: &str| Identity {
        resource_type: "Patient".into(),
        system: system.into(),
        value: value.into(),
    };
    let (first, second, neither) = (want("urn:a|b", "c"), want("urn:a", "b|c"), want("urn:a|b|c", ""));
    let (holders, _) = crate::source::identifier_holders(
        &schema,
        &[&first, &second, &neither],
        &[("Patient".into(), "p900".into()), ("Patient".into(), "p901".into())],
    )
    .unwrap();
    let of = |i: &Identity| holders.by_identity.get(i).cloned().unwrap_or_default();
    assert_eq!(of(&first), vec![(patient, "900".to_string())]);
    assert_eq!(of(&second), vec![(patient, "901".to_string())]);
    assert_eq!(of(&neither), vec![]);
    let by_id = |id: &str| holders.by_id.get(&("Patient".to_string(), id.to_string())).cloned();
    assert_eq!(by_id("p900"), Some(vec![(patient, "900".to_string())]));
    assert_eq!(by_id("p901"), None);

    // With sequential scans priced out, so that the small table does not hide the plan.
    let (by_identity_sql, by_id_sql) = crate::source::holders_sql(&schema);
    Spi::run("SET LOCAL enable_seqscan = off").unwrap();
    Spi::run(&format!("PREPARE fhir_sync_test_by_identity (text[], text[], text[]) AS {by_identity_sql}")).unwrap();
    Spi::run(&format!("PREPARE fhir_sync_test_by_id (text[], text[]) AS {by_id_sql}")).unwrap();
    let plan = |sql: &str| -> String {
        Spi::connect(|client| {
            client
                .select(sql, None, &[])
                .unwrap()
                .map(|row| row.get::<String>(1).unwrap().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        })
    };
    let identity_plan = plan(
        "EXPLAIN (COSTS OFF) EXECUTE fhir_sync_test_by_identity (ARRAY['Patient'], ARRAY['urn:a'], ARRAY['b|c'])",
    );
    let id_plan = plan("EXPLAIN (COSTS OFF) EXECUTE fhir_sync_test_by_id (ARRAY['Patient'], ARRAY['p900'])");
    Spi::run("DEALLOCATE fhir_sync_test_by_identity; DEALLOCATE fhir_sync_test_by_id").unwrap();
    // A probe, not a walk of the whole index (which a partial index also allows): the hash is the
    // index condition.
    let probes = |plan: &str, index: &str, key: &str| {
        plan.contains(index) && plan.contains(&format!("Index Cond: (hashtextextended({key}"))
    };
    assert!(probes(&identity_plan, "fhir_sync_state_identifier_idx", "identifier_value"), "{identity_plan}");
    assert!(probes(&id_plan, "fhir_sync_state_fhir_id_idx", "fhir_id"), "{id_plan}");
}
