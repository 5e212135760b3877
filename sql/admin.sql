-- Housekeeping a DBA runs from SQL: requeue dead letters, delete old history.
-- SECURITY DEFINER with EXECUTE revoked from PUBLIC (privileges.sql): granting EXECUTE on one of
-- these is all a role needs to run it; they touch only fhir_sync's own tables.

-- Requeues dead letters as fresh outbox rows (attempts start again at 0). The dead letter
-- stays, marked requeued, so the DLQ keeps the record of what failed and when it was retried.
CREATE FUNCTION fhir_requeue_dlq(ids bigint[]) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    ext_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                        WHERE e.extname = 'fhir_sync');
    d          record;
    new_id     bigint;
    n          bigint := 0;
BEGIN
    FOR d IN EXECUTE format('SELECT * FROM %I.fhir_dlq WHERE id = ANY ($1) AND NOT requeued ORDER BY id FOR UPDATE', ext_schema)
             USING ids
    LOOP
        EXECUTE format($q$
            INSERT INTO %I.fhir_outbox (txid, table_name, record_id, operation, resource_type, resource_table,
                                        resource_key, payload_json, identifier_system, identifier_value)
            VALUES (txid_current(), $1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id$q$, ext_schema)
        USING d.table_name, d.record_id, d.operation, d.resource_type, d.resource_table, d.resource_key,
              d.payload_json, d.identifier_system, d.identifier_value
        INTO new_id;
        EXECUTE format('UPDATE %I.fhir_dlq SET requeued = true, requeued_at = now(), requeued_outbox_id = $2 WHERE id = $1', ext_schema)
        USING d.id, new_id;
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        EXECUTE format('SELECT %I.fhir_sync_wake()', ext_schema);
    END IF;
    RETURN n;
END
$fn$;

CREATE FUNCTION fhir_requeue_dlq(id bigint) RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$ SELECT @extschema@.fhir_requeue_dlq(ARRAY[id]) $fn$;

-- With no argument: every dead letter not yet requeued. The filters combine with AND:
--   SELECT fhir_requeue_dlq(table_name => 'blood_pressure', since => now() - interval '1 day');
--   SELECT fhir_requeue_dlq(http_status => 422);  SELECT fhir_requeue_dlq(error_class => 'transient');
CREATE FUNCTION fhir_requeue_dlq(
    table_name  text DEFAULT NULL,
    http_status integer DEFAULT NULL,
    error_class text DEFAULT NULL,
    since       timestamptz DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    ext_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                        WHERE e.extname = 'fhir_sync');
    picked     bigint[];
    rel        regclass := CASE WHEN $1 IS NULL THEN NULL ELSE to_regclass($1) END;
BEGIN
    EXECUTE format($q$
        SELECT coalesce(array_agg(d.id ORDER BY d.id), '{}') FROM %I.fhir_dlq d
         WHERE NOT d.requeued
           AND ($1::text IS NULL OR d.table_name = $1 OR d.resource_table = $2 OR d.table_name = $2::text)
           AND ($3::int IS NULL OR d.http_status = $3)
           AND ($4::text IS NULL OR d.error_class = $4)
           AND ($5::timestamptz IS NULL OR d.last_failed_at >= $5)$q$, ext_schema)
    USING $1, rel, $2, $3, $4
    INTO picked;
    RETURN @extschema@.fhir_requeue_dlq(picked);
END
$fn$;

-- Deletes delivered outbox rows processed more than `days` days ago, and dead letters whose
-- last failure is more than 3 × `days` days old (they are kept longer: someone may still need
-- to read why they failed).
CREATE FUNCTION fhir_cleanup_old(days integer DEFAULT 30)
RETURNS TABLE (outbox_deleted bigint, dlq_deleted bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    ext_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                        WHERE e.extname = 'fhir_sync');
BEGIN
    IF days IS NULL OR days < 0 THEN
        RAISE EXCEPTION 'days must be zero or more, not %', days USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('DELETE FROM %I.fhir_outbox WHERE processed AND processed_at < now() - make_interval(days => $1)', ext_schema)
    USING days;
    GET DIAGNOSTICS outbox_deleted = ROW_COUNT;
    EXECUTE format('DELETE FROM %I.fhir_dlq WHERE last_failed_at < now() - make_interval(days => 3 * $1)', ext_schema)
    USING days;
    GET DIAGNOSTICS dlq_deleted = ROW_COUNT;
    RETURN NEXT;
END
$fn$;

-- What the delivery workers need when they connect as `worker` (fhir_sync.username): their own
-- tables. Nothing on the tracked tables or mapping functions: the workers
-- read those as the tables' owners (sandbox.rs). Run it again after ALTER EXTENSION … UPDATE.
CREATE FUNCTION fhir_sync_grant_worker(worker regrole) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA @extschema@ TO %s', worker);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON @extschema@.fhir_outbox, @extschema@.fhir_dlq, '
                   '@extschema@.fhir_sync_state TO %s', worker);
    EXECUTE format('GRANT SELECT ON @extschema@.fhir_tracked TO %s', worker);
    -- The claim reads how far outbox ids have been handed out.
    EXECUTE format('GRANT SELECT ON SEQUENCE %s TO %s',
                   pg_get_serial_sequence('@extschema@.fhir_outbox', 'id'), worker);
END
$fn$;
