-- fhir_sync 0.3.0 → 0.4.0. Released scripts are never edited; this one carries a 0.3.0 database
-- to what a fresh 0.4.0 install defines (tests/e2e/test_upgrade.py compares the two).
--
-- 0.4.0: pg_dump keeps the outbox's pending changes (not the delivered history) and the dead
-- letters, with their identity sequences, beside the tracking configuration and sync state it
-- kept already: a database restored from a dump resumes delivery where it stopped.

SELECT pg_catalog.pg_extension_config_dump('@extschema@.fhir_outbox', 'WHERE NOT processed');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.fhir_outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.fhir_dlq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.fhir_dlq_id_seq', '');
