-- fhir_sync 0.6.1 → 0.7.0. Released scripts are never edited; this one carries a 0.6.1 database
-- to what a fresh 0.7.0 install defines (tests/e2e/test_upgrade.py compares the two).
--
-- The two indexes of fhir_sync_state that the identity guard reads are keyed by 64-bit hashes
-- instead of the text, and a reservation (no id yet) gets no entry in the id index: a first write
-- writes ~200 bytes of WAL less (docs/delivery.md §6). The 0.7.0 worker reads through the new
-- expressions; a 0.6.1 worker claims nothing against a 0.7.0 database, nor the reverse, so no
-- statement runs without its index.
--
-- DROP INDEX locks fhir_sync_state exclusively until the update commits, and each CREATE INDEX reads
-- the whole table (both builds: ~2 s per million rows on the bench machine): until then the workers'
-- cycles, fhir_sync_resources and any other reader of fhir_sync_state wait (captures do not: they
-- never read it).
DROP INDEX @extschema@.fhir_sync_state_identifier_idx;
CREATE INDEX fhir_sync_state_identifier_idx ON @extschema@.fhir_sync_state
    (pg_catalog.hashtextextended(identifier_value, pg_catalog.hashtextextended(identifier_system, 0)))
    WHERE NOT deleted;
DROP INDEX @extschema@.fhir_sync_state_fhir_id_idx;
CREATE INDEX fhir_sync_state_fhir_id_idx ON @extschema@.fhir_sync_state (pg_catalog.hashtextextended(fhir_id, 0))
    WHERE fhir_id IS NOT NULL AND NOT deleted;
