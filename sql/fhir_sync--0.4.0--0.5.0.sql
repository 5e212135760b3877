-- fhir_sync 0.4.0 → 0.5.0. Released scripts are never edited; this one carries a 0.4.0 database
-- to what a fresh 0.5.0 install defines (tests/e2e/test_upgrade.py compares the two).
--
-- 0.5.0: one source row, one resource — the worker looks up which rows already map to an
-- identifier before it sends (this index); SMART Backend Services — fhir_sync_jwks() prints the
-- public keys to register with the EHR.

CREATE INDEX fhir_sync_state_identifier_idx ON @extschema@.fhir_sync_state (identifier_value, identifier_system)
    WHERE NOT deleted;

CREATE FUNCTION @extschema@."fhir_sync_jwks"() RETURNS jsonb
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_sync_jwks_wrapper';
REVOKE EXECUTE ON FUNCTION @extschema@.fhir_sync_jwks() FROM PUBLIC;
