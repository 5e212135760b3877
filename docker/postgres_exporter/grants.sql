-- The role postgres_exporter connects as, with what queries.yaml needs and nothing more.
-- Run as a superuser in the database where CREATE EXTENSION fhir_sync was run (psql -d <db> -f grants.sql).
-- Then give the role a password (ALTER ROLE fhir_sync_exporter PASSWORD '...') or a pg_hba.conf rule.
--
--   pg_read_all_stats   postgres_exporter's own metrics (pg_up, pg_stat_*, database sizes). Not
--                       pg_monitor: it includes pg_read_all_settings, which reads fhir_sync's secrets.
--   SELECT on the views the fhir_sync queries read. The views run with their owner's rights, so
--                       the role never reads fhir_outbox / fhir_dlq (patient data) itself.
--   EXECUTE on fhir_sync_stats(), fhir_sync_latency_histogram(), fhir_sync_call_errors() and
--                       fhir_sync_worker_slots(), which the views call (a view's functions are
--                       called with the reader's rights): revoked from PUBLIC by CREATE EXTENSION
--                       since 0.2.0, as they expose worker pids and counters. They only read
--                       shared memory; nothing here can change fhir_sync's state
--                       (fhir_sync_reset_stats() stays revoked).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'fhir_sync_exporter') THEN
        CREATE ROLE fhir_sync_exporter LOGIN;
    END IF;
    EXECUTE pg_catalog.format('GRANT CONNECT ON DATABASE %I TO fhir_sync_exporter', pg_catalog.current_database());
    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA %I TO fhir_sync_exporter',
                              (SELECT n.nspname FROM pg_catalog.pg_extension e
                                 JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
                                WHERE e.extname = 'fhir_sync'));
END
$$;

GRANT pg_read_all_stats TO fhir_sync_exporter;
GRANT SELECT ON fhir_sync_status, fhir_sync_workers, fhir_sync_tables, fhir_pending_transactions, fhir_sync_metrics
    TO fhir_sync_exporter;
GRANT EXECUTE ON FUNCTION fhir_sync_stats(), fhir_sync_latency_histogram(), fhir_sync_call_errors(),
    fhir_sync_worker_slots(), fhir_sync_delivered_counts() TO fhir_sync_exporter;
