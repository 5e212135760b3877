-- The SQL surface as a DBA meets it: tracking, capture, preview, dead letters, requeue, cleanup.
-- Run by tests/e2e/test_sql_regress.py against a cluster with no FHIR server configured, so
-- nothing is delivered and the outbox stays as captured.
\set VERBOSITY default
CREATE EXTENSION fhir_sync;
\set ECHO none
\i tests/fixtures/health_tables.sql
\set ECHO all
SELECT fhir_track('patient', 'Patient');
SELECT fhir_track('patient_other_identifiers', 'Patient');
SELECT fhir_track('form', 'Encounter');
SELECT fhir_track('blood_pressure', 'Observation');
SELECT fhir_track('pulse', 'Observation');
SELECT table_name, resource_type, mapper, key_column, parent_table, parent_column FROM fhir_tracked ORDER BY 1::text;

-- A table fhir_sync cannot map by itself.
CREATE TABLE note (id int PRIMARY KEY, body text);
SELECT fhir_track('note', 'Observation');
CREATE TABLE nokey (body text);
SELECT fhir_track('nokey', 'Basic', map_function => 'fhir_patient_json(anyelement)'::regprocedure);

\set ECHO none
\o /dev/null
\i tests/fixtures/sample_rows.sql
\o
\set ECHO all
SELECT id, table_name, record_id, operation, resource_type, resource_table, resource_key, identifier_value, processed
  FROM fhir_outbox ORDER BY id;

UPDATE patient SET name_family = 'Okafor-Smith' WHERE id = 1;
DELETE FROM pulse WHERE id = 1;
BEGIN;
INSERT INTO patient (identifier_system, identifier_value) VALUES ('urn:x', 'rolled-back');
ROLLBACK;
SELECT id, table_name, record_id, operation FROM fhir_outbox WHERE id > 6 ORDER BY id;

SELECT jsonb_pretty(fhir_preview('patient', 1));
SELECT jsonb_pretty(fhir_preview('blood_pressure', 1));
SELECT fhir_preview('pulse', 1);
SELECT fhir_preview('note', 1);

UPDATE patient SET gender = 'banana' WHERE id = 2;
SELECT fhir_patient_json(p) FROM patient p WHERE id = 2;

SELECT table_name, pending, processed, dead_lettered FROM fhir_sync_tables ORDER BY 1;
SELECT txid > 0 AS has_txid, changes, tables FROM fhir_pending_transactions ORDER BY first_change_at LIMIT 1;

-- Dead letters: requeue by status, then everything; the DLQ keeps the record.
INSERT INTO fhir_dlq (outbox_ids, table_name, record_id, operation, resource_type, resource_table, resource_key,
                      error_class, error, http_status)
VALUES ('{1}', 'public.patient', '2', 'U', 'Patient', 'patient', '2', 'rejected', 'HTTP 422', 422),
       ('{6}', 'public.pulse', '1', 'I', 'Observation', 'pulse', '1', 'exhausted', 'gave up after 5 attempts: HTTP 503', 503);
SELECT fhir_requeue_dlq(http_status => 422);
SELECT fhir_requeue_dlq();
SELECT fhir_requeue_dlq();
SELECT id, error_class, requeued, requeued_outbox_id IS NOT NULL AS has_new_row FROM fhir_dlq ORDER BY id;

SELECT * FROM fhir_cleanup_old(30);
-- Three changes delivered 31 days ago (the settle moves a delivered change to the history).
WITH moved AS (DELETE FROM fhir_outbox WHERE id <= 3 RETURNING *)
INSERT INTO fhir_outbox_delivered (id, txid, table_name, record_id, operation, resource_type, resource_table,
       resource_key, created_at, processed_at, attempts)
SELECT id, txid, table_name, record_id, operation, resource_type, resource_table, resource_key, created_at,
       now() - interval '31 days', attempts FROM moved;
SELECT * FROM fhir_cleanup_old(30);
SELECT fhir_cleanup_old(-1);

SELECT fhir_untrack('pulse');
SELECT fhir_untrack('pulse');
