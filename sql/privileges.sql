-- Nothing of fhir_sync is usable by ordinary roles until a DBA grants it. Tables are never
-- granted to PUBLIC; functions are, by default, so revoke them here. The mappers stay public:
-- they only turn a row the caller can already read into JSON.
REVOKE ALL ON fhir_tracked, fhir_outbox, fhir_dlq, fhir_sync_state FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION
    fhir_track(regclass, text, regprocedure, name, text, text),
    fhir_untrack(regclass, boolean),
    fhir_backfill(regclass),
    fhir_requeue_dlq(bigint[]),
    fhir_requeue_dlq(bigint),
    fhir_requeue_dlq(text, integer, text, timestamptz),
    fhir_cleanup_old(integer),
    fhir_preview(regclass, anyelement),
    fhir_preview_row(oid, text),
    fhir_capture()
FROM PUBLIC;
REVOKE ALL ON fhir_sync_status, fhir_sync_workers, fhir_sync_tables, fhir_pending_transactions, fhir_sync_metrics FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fhir_sync_reset_stats(), fhir_sync_explain_claim(integer) FROM PUBLIC;
