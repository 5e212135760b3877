-- fhir_sync 0.5.0 → 0.6.0. Released scripts are never edited; this one carries a 0.5.0 database
-- to what a fresh 0.6.0 install defines (tests/e2e/test_upgrade.py compares the two).
--
-- 0.6.0, a delivered change costs the primary less WAL (docs/delivery.md):
-- - a delivered change leaves fhir_outbox for fhir_outbox_delivered, an UNLOGGED history, instead
--   of being rewritten in place; the outbox keeps no room on its pages for rewrites;
-- - the version of each resource's last write goes to fhir_sync_version, an UNLOGGED cache;
--   fhir_sync_state is rewritten only when what a row maps to changes;
-- - fhir_sync_resources shows the two together; fhir_sync_tables counts the history.
-- Pending changes stay where they are, with their ids; the delivered ones move to the history.

CREATE UNLOGGED TABLE @extschema@.fhir_outbox_delivered (
    id                bigint      NOT NULL,
    txid              bigint      NOT NULL,
    table_name        text        NOT NULL,
    record_id         text        NOT NULL,
    operation         char(1)     NOT NULL,
    resource_type     text        NOT NULL,
    resource_table    regclass    NOT NULL,
    resource_key      text        NOT NULL,
    created_at        timestamptz NOT NULL,
    processed_at      timestamptz NOT NULL,
    attempts          integer     NOT NULL,
    first_failed_at   timestamptz,
    fhir_resource_id  text,
    fhir_version      text
);
-- fhir_cleanup_old() deletes by age.
CREATE INDEX fhir_outbox_delivered_processed_at_idx ON @extschema@.fhir_outbox_delivered (processed_at);

-- In one statement: a 0.5.0 worker may still be marking rows delivered meanwhile.
WITH moved AS (
    DELETE FROM @extschema@.fhir_outbox o WHERE o.processed
    RETURNING o.id, o.txid, o.table_name, o.record_id, o.operation, o.resource_type, o.resource_table,
              o.resource_key, o.created_at, coalesce(o.processed_at, o.created_at) AS processed_at, o.attempts,
              o.first_failed_at, o.fhir_resource_id, o.fhir_version)
INSERT INTO @extschema@.fhir_outbox_delivered (id, txid, table_name, record_id, operation, resource_type,
       resource_table, resource_key, created_at, processed_at, attempts, first_failed_at, fhir_resource_id,
       fhir_version)
SELECT * FROM moved;
DROP INDEX @extschema@.fhir_outbox_processed_at_idx;
-- (Pages written from now on.)
ALTER TABLE @extschema@.fhir_outbox RESET (fillfactor);

CREATE UNLOGGED TABLE @extschema@.fhir_sync_version (
    resource_table    regclass    NOT NULL,
    resource_key      text        NOT NULL,
    fhir_version      text,
    synced_at         timestamptz NOT NULL,
    outbox_id         bigint,
    PRIMARY KEY (resource_table, resource_key)
) WITH (fillfactor = 70);

CREATE OR REPLACE FUNCTION @extschema@.fhir_cleanup_old(days integer DEFAULT 30)
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

CREATE FUNCTION @extschema@.fhir_sync_delivered_counts()
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
REVOKE EXECUTE ON FUNCTION @extschema@.fhir_sync_delivered_counts() FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.fhir_sync_grant_worker(worker regrole) RETURNS void
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

CREATE OR REPLACE VIEW @extschema@.fhir_sync_tables AS
WITH o AS (
    SELECT table_name, resource_type, pg_catalog.count(*) AS pending, pg_catalog.min(created_at) AS oldest
      FROM @extschema@.fhir_outbox WHERE NOT processed GROUP BY 1, 2
), h AS (
    SELECT table_name, resource_type, delivered FROM @extschema@.fhir_sync_delivered_counts()
), d AS (
    SELECT table_name, resource_type, pg_catalog.count(*) FILTER (WHERE NOT requeued) AS dead_lettered
      FROM @extschema@.fhir_dlq GROUP BY 1, 2
)
SELECT table_name, resource_type,
       coalesce(o.pending, 0) AS pending,
       coalesce(h.delivered, 0) AS processed,
       coalesce(d.dead_lettered, 0) AS dead_lettered,
       coalesce(extract(epoch FROM pg_catalog.clock_timestamp() - o.oldest), 0)::float8 AS lag_seconds
  FROM o FULL JOIN h USING (table_name, resource_type) FULL JOIN d USING (table_name, resource_type);

-- fhir_sync_tables (and fhir_sync_metrics, which reads it) now count the history through
-- fhir_sync_delivered_counts(), and a function a view calls is checked against the caller: a role
-- that may read either view may run it.
DO $carry$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT r.rolname
               FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a, pg_catalog.pg_roles r
              WHERE c.oid OPERATOR(pg_catalog.=) ANY (ARRAY['@extschema@.fhir_sync_tables'::pg_catalog.regclass,
                                                            '@extschema@.fhir_sync_metrics'::pg_catalog.regclass])
                AND a.privilege_type OPERATOR(pg_catalog.=) 'SELECT' AND r.oid OPERATOR(pg_catalog.=) a.grantee
                AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION @extschema@.fhir_sync_delivered_counts() TO %I', g.rolname);
    END LOOP;
END
$carry$;

CREATE VIEW @extschema@.fhir_sync_resources AS
SELECT s.resource_table, s.resource_key, s.resource_type, s.fhir_id,
       CASE WHEN v.synced_at >= s.last_synced_at THEN v.fhir_version ELSE s.fhir_version END AS fhir_version,
       s.identifier_system, s.identifier_value, s.deleted,
       GREATEST(s.last_synced_at, v.synced_at) AS last_synced_at,
       GREATEST(s.last_outbox_id, v.outbox_id) AS last_outbox_id
  FROM @extschema@.fhir_sync_state s
  LEFT JOIN @extschema@.fhir_sync_version v
         ON v.resource_table OPERATOR(pg_catalog.=) s.resource_table
        AND v.resource_key OPERATOR(pg_catalog.=) s.resource_key;
REVOKE ALL ON @extschema@.fhir_outbox_delivered, @extschema@.fhir_sync_version, @extschema@.fhir_sync_resources
    FROM PUBLIC;

-- The worker role gets the new tables as a fresh install gives them (privileges.sql).
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
