-- Nothing of fhir_sync is usable by ordinary roles until a DBA grants it. Tables are never
-- granted to PUBLIC; functions are, by default, so revoke them here: everything that changes
-- state, exposes worker pids, state or counters, or wakes the workers. The mappers stay public:
-- they only turn a row the caller can already read into JSON.
REVOKE ALL ON fhir_tracked, fhir_outbox, fhir_dlq, fhir_sync_state, fhir_sync_version, fhir_outbox_delivered FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION
    fhir_track(regclass, text, regprocedure, name, text, text, boolean, text),
    fhir_untrack(regclass, boolean),
    fhir_backfill(regclass),
    fhir_backfill_keys(oid),
    fhir_requeue_dlq(bigint[]),
    fhir_requeue_dlq(bigint),
    fhir_requeue_dlq(text, integer, text, timestamptz),
    fhir_cleanup_old(integer),
    fhir_sync_delivered_counts(),
    fhir_preview(regclass, anyelement),
    fhir_preview_row(oid, text),
    fhir_capture(),
    fhir_sync_wake(),
    fhir_sync_stats(),
    fhir_sync_worker_slots(),
    fhir_sync_latency_histogram(),
    fhir_sync_call_errors(),
    fhir_sync_grant_worker(regrole),
    fhir_sync_jwks(),
    fhir_sync_server_capabilities()
FROM PUBLIC;
REVOKE ALL ON fhir_sync_status, fhir_sync_workers, fhir_sync_tables, fhir_pending_transactions, fhir_sync_metrics,
    fhir_sync_server, fhir_sync_resources FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fhir_sync_reset_stats(), fhir_sync_explain_claim(integer) FROM PUBLIC;

-- The worker role named by fhir_sync.username gets what it needs at once (also after a DROP
-- and CREATE EXTENSION); another role can be given it later with fhir_sync_grant_worker.
DO $grant$
DECLARE
    worker text := pg_catalog.current_setting('fhir_sync.username', true);
BEGIN
    IF worker IS NOT NULL AND worker <> ''
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) worker) THEN
        PERFORM @extschema@.fhir_sync_grant_worker(pg_catalog.quote_ident(worker)::pg_catalog.regrole);
    END IF;
END
$grant$;
