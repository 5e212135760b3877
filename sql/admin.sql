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
    d          record;
    new_id     bigint;
    n          bigint := 0;
BEGIN
    FOR d IN SELECT * FROM @extschema@.fhir_dlq q WHERE q.id = ANY (ids) AND NOT q.requeued ORDER BY q.id FOR UPDATE
    LOOP
        INSERT INTO @extschema@.fhir_outbox (txid, table_name, record_id, operation, resource_type, resource_table,
                                             resource_key, payload_json, identifier_system, identifier_value)
        VALUES (txid_current(), d.table_name, d.record_id, d.operation, d.resource_type, d.resource_table,
                d.resource_key, d.payload_json, d.identifier_system, d.identifier_value)
        RETURNING id INTO new_id;
        UPDATE @extschema@.fhir_dlq SET requeued = true, requeued_at = now(), requeued_outbox_id = new_id
         WHERE id = d.id;
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        PERFORM @extschema@.fhir_sync_wake();
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
    picked     bigint[];
    rel        regclass := CASE WHEN $1 IS NULL THEN NULL ELSE to_regclass($1) END;
BEGIN
    SELECT coalesce(array_agg(d.id ORDER BY d.id), '{}') INTO picked FROM @extschema@.fhir_dlq d
     WHERE NOT d.requeued
       AND ($1 IS NULL OR d.table_name = $1 OR d.resource_table = rel OR d.table_name = rel::text)
       AND ($2 IS NULL OR d.http_status = $2)
       AND ($3 IS NULL OR d.error_class = $3)
       AND ($4 IS NULL OR d.last_failed_at >= $4);
    RETURN @extschema@.fhir_requeue_dlq(picked);
END
$fn$;

-- Deletes the delivered history (fhir_outbox_delivered) of changes delivered more than `days`
-- days ago, and dead letters whose last failure is more than 3 × `days` days old (they are kept
-- longer: someone may still need to read why they failed).
CREATE FUNCTION fhir_cleanup_old(days integer DEFAULT 30)
RETURNS TABLE (outbox_deleted bigint, dlq_deleted bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n bigint;
BEGIN
    IF days IS NULL OR days < 0 THEN
        RAISE EXCEPTION 'days must be zero or more, not %', days USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM @extschema@.fhir_outbox_delivered o WHERE o.processed_at < now() - make_interval(days => days);
    GET DIAGNOSTICS outbox_deleted = ROW_COUNT;
    -- Marked delivered in place by a worker of 0.5.0 or older that settled after the update.
    DELETE FROM @extschema@.fhir_outbox o WHERE o.processed AND o.processed_at < now() - make_interval(days => days);
    GET DIAGNOSTICS n = ROW_COUNT;
    outbox_deleted := outbox_deleted + n;
    DELETE FROM @extschema@.fhir_dlq q WHERE q.last_failed_at < now() - make_interval(days => 3 * days);
    GET DIAGNOSTICS dlq_deleted = ROW_COUNT;
    RETURN NEXT;
END
$fn$;

-- Delivered changes per source table and resource type, for fhir_sync_tables. Nothing on a
-- standby: the history is unlogged, and a statement that names an unlogged table fails there
-- when it is planned, so the count is planned only when it can run (PL/pgSQL plans a statement
-- when it first reaches it). SECURITY DEFINER: a role that may read the view gets the counts,
-- not the rows.
CREATE FUNCTION fhir_sync_delivered_counts()
RETURNS TABLE (table_name text, resource_type text, delivered bigint)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pg_is_in_recovery() THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT h.table_name, h.resource_type, count(*)
                   FROM @extschema@.fhir_outbox_delivered h GROUP BY 1, 2;
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
                   '@extschema@.fhir_sync_state, @extschema@.fhir_sync_version TO %s', worker);
    -- The settle adds to the history; fhir_cleanup_old (SECURITY DEFINER) empties it.
    EXECUTE format('GRANT INSERT ON @extschema@.fhir_outbox_delivered TO %s', worker);
    EXECUTE format('GRANT SELECT ON @extschema@.fhir_tracked TO %s', worker);
    -- The claim reads how far outbox ids have been handed out.
    EXECUTE format('GRANT SELECT ON SEQUENCE %s TO %s',
                   pg_get_serial_sequence('@extschema@.fhir_outbox', 'id'), worker);
END
$fn$;
