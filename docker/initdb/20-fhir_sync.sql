-- Runs once, when the postgres container initialises its data directory, in $POSTGRES_DB
-- (after 10-health_tables.sql, the demo tables of tests/fixtures/health_tables.sql).
CREATE EXTENSION fhir_sync;
SELECT fhir_track('patient', 'Patient');
SELECT fhir_track('patient_other_identifiers', 'Patient');
SELECT fhir_track('form', 'Encounter');
SELECT fhir_track('blood_pressure', 'Observation');
SELECT fhir_track('pulse', 'Observation');
