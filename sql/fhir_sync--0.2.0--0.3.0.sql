-- fhir_sync 0.2.0 → 0.3.0. Released scripts are never edited; this one carries a 0.2.0 database
-- to what a fresh 0.3.0 install defines (tests/e2e/test_upgrade.py compares the two).
--
-- 0.3.0: the built-in mappers come from one registry in Rust (fhir_mapper_names(),
-- fhir_builtin_mapper()), which fhir_tracked's CHECK and fhir_track read; the reference rule
-- (foreign key, else the tracked table of the same owner) is one function,
-- fhir_reference_target(); the plpgsql functions name the extension's schema with @extschema@
-- instead of looking it up; fhir_sync_workers shows each worker's loop count (cycles).

CREATE FUNCTION @extschema@."fhir_mapper_names"() RETURNS TEXT[]
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_mapper_names_wrapper';

CREATE FUNCTION @extschema@."fhir_builtin_mapper"(
	"resource_type" TEXT,
	"columns" TEXT[]
) RETURNS TEXT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_builtin_mapper_wrapper';

-- Raises fhir_sync's own errors for its SQL functions (messages written once, in error.rs).
CREATE FUNCTION @extschema@."fhir_raise"(
	"error" TEXT,
	"subject" TEXT,
	"resource_type" TEXT DEFAULT NULL
) RETURNS void
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_raise_wrapper';

ALTER TABLE @extschema@.fhir_tracked DROP CONSTRAINT fhir_tracked_mapper_check;
ALTER TABLE @extschema@.fhir_tracked ADD CONSTRAINT fhir_tracked_mapper_check
    CHECK (mapper = ANY (@extschema@.fhir_mapper_names()));

CREATE FUNCTION fhir_reference_target("table" regclass, "column" name, mapper text) RETURNS regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT coalesce(
    (SELECT c.confrelid::regclass
       FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
      WHERE c.conrelid = $1 AND c.contype = 'f' AND a.attname = $2
      ORDER BY c.oid LIMIT 1),
    (SELECT min(x.table_name::oid)::regclass
       FROM @extschema@.fhir_tracked x JOIN pg_class xc ON xc.oid = x.table_name
      WHERE x.mapper = $3 AND xc.relowner = (SELECT r.relowner FROM pg_class r WHERE r.oid = $1)))
$fn$;

CREATE OR REPLACE FUNCTION fhir_track(
    "table"           regclass,
    resource_type     text,
    map_function      regprocedure DEFAULT NULL,
    identifier_column name DEFAULT NULL,
    identifier_system text DEFAULT NULL,
    mapper            text DEFAULT NULL,
    function_owner_trusted boolean DEFAULT false
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    -- The schema's name as it is, not quoted: the capture trigger's first argument, and quoted
    -- by format's %I (@extschema@ inside a format string would read a % in the name).
    ext_schema name := (SELECT n.nspname FROM pg_namespace n WHERE n.oid = '@extschema@'::regnamespace);
    cols       text[];
    key_col    name;
    parent     regclass;
    parent_col name;
    chosen     text := mapper;
    owner      oid := (SELECT c.relowner FROM pg_class c WHERE c.oid = "table");
    fn         record;
    fn_owner   regrole;
BEGIN
    IF "table" IS NULL OR resource_type IS NULL THEN
        RAISE EXCEPTION 'table and resource_type must not be null';
    END IF;
    IF resource_type !~ '^[A-Z][A-Za-z]{1,63}$' THEN
        RAISE EXCEPTION '"%" is not a FHIR resource type', resource_type
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Resource types are written like Patient, Encounter or Observation.';
    END IF;
    IF (SELECT relkind FROM pg_class WHERE oid = "table") NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', "table" USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT pg_has_role(current_user, owner, 'USAGE') THEN
        RAISE EXCEPTION 'must be able to act as the owner of table % to track it', "table"
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'fhir_sync runs the owner''s code (casts, the mapping function) as the owner; ask the owner or a superuser to track it.';
    END IF;

    SELECT array_agg(attname::text) INTO cols
      FROM pg_attribute WHERE attrelid = "table" AND attnum > 0 AND NOT attisdropped;

    SELECT a.attname INTO key_col
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
     WHERE i.indrelid = "table" AND i.indisprimary AND i.indnatts = 1;
    IF key_col IS NULL THEN
        PERFORM @extschema@.fhir_raise('no_primary_key', "table"::text);
    END IF;

    IF map_function IS NOT NULL THEN
        SELECT p.pronargs, p.proargtypes[0] AS arg, p.prorettype, p.proretset, p.proowner INTO fn
          FROM pg_proc p WHERE p.oid = map_function;
        IF fn.pronargs <> 1 OR fn.arg <> (SELECT c.reltype FROM pg_class c WHERE c.oid = "table") OR fn.proretset
           OR fn.prorettype NOT IN ('jsonb'::regtype, 'json'::regtype) THEN
            RAISE EXCEPTION 'mapping function % must take exactly one % row and return jsonb', map_function, "table"
                USING ERRCODE = 'invalid_function_definition',
                      HINT = format('Declare it as CREATE FUNCTION f(r %s) RETURNS jsonb.', "table");
        END IF;
        IF fn.proowner <> owner THEN
            IF NOT function_owner_trusted THEN
                RAISE EXCEPTION 'mapping function % is not owned by the owner of table %', map_function, "table"
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'The function runs with the table owner''s rights: make the table''s owner its owner, or, as a superuser, pass function_owner_trusted => true.';
            ELSIF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
                RAISE EXCEPTION 'only a superuser may accept a mapping function owned by another role'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            fn_owner := fn.proowner;
        END IF;
    END IF;

    IF map_function IS NOT NULL THEN
        chosen := 'function';
    ELSIF chosen IS NULL THEN
        chosen := @extschema@.fhir_builtin_mapper(resource_type, cols);
        IF chosen IS NULL THEN
            PERFORM @extschema@.fhir_raise('no_builtin_mapper', "table"::text, resource_type);
        END IF;
    END IF;
    IF NOT (chosen = ANY (@extschema@.fhir_mapper_names())) THEN
        RAISE EXCEPTION 'unknown mapper "%"', chosen USING ERRCODE = 'invalid_parameter_value',
            HINT = format('Use one of %s, or pass map_function.',
                          array_to_string(array_remove(@extschema@.fhir_mapper_names(), 'function'), ', '));
    END IF;
    IF chosen = 'function' AND map_function IS NULL THEN
        RAISE EXCEPTION 'mapper "function" needs a map_function' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass map_function => ''my_mapper(my_table)''::regprocedure.';
    END IF;
    IF identifier_column IS NOT NULL AND NOT (identifier_column::text = ANY (cols)) THEN
        RAISE EXCEPTION 'table % has no column "%"', "table", identifier_column USING ERRCODE = 'undefined_column';
    END IF;

    IF chosen = 'patient_identifier' THEN
        parent_col := 'patient_id';
        -- The foreign key says which table the identifiers belong to; without one, the tracked
        -- Patient table of the same owner does.
        parent := @extschema@.fhir_reference_target("table", parent_col, 'patient');
        IF parent IS NULL THEN
            RAISE EXCEPTION 'cannot find the patient table that % belongs to', "table"
                USING ERRCODE = 'invalid_table_definition',
                      HINT = 'Add a foreign key on patient_id, or track the patient table (of the same owner) first.';
        END IF;
        IF NOT pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = parent), 'USAGE') THEN
            RAISE EXCEPTION 'must be able to act as the owner of table %, the patient table % belongs to', parent, "table"
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;

    INSERT INTO @extschema@.fhir_tracked AS t (table_name, resource_type, mapper, key_column, parent_table,
                                               parent_column, map_function, identifier_column, identifier_system,
                                               map_function_owner)
    VALUES ("table", fhir_track.resource_type, chosen, key_col, parent, parent_col, fhir_track.map_function,
            fhir_track.identifier_column, fhir_track.identifier_system, fn_owner)
    ON CONFLICT ON CONSTRAINT fhir_tracked_pkey DO UPDATE SET
        resource_type = excluded.resource_type, mapper = excluded.mapper, key_column = excluded.key_column,
        parent_table = excluded.parent_table, parent_column = excluded.parent_column,
        map_function = excluded.map_function, identifier_column = excluded.identifier_column,
        identifier_system = excluded.identifier_system,
        map_function_owner = excluded.map_function_owner;

    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = "table" AND tgname = 'fhir_sync_capture') THEN
        EXECUTE format('DROP TRIGGER fhir_sync_capture ON %s', "table");
    END IF;
    EXECUTE format('CREATE TRIGGER fhir_sync_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION %I.fhir_capture(%L, %L, %L, %L, %L, %L)',
                   "table", ext_schema, ext_schema, resource_type, key_col,
                   coalesce(parent::oid::text, ''), coalesce(parent_col::text, ''), chosen);
    RETURN format('tracking %s as %s (%s)', "table", resource_type, chosen);
END
$fn$;

CREATE OR REPLACE FUNCTION fhir_untrack("table" regclass, discard_pending boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    found_row  boolean;
    discarded  bigint := 0;
BEGIN
    DELETE FROM @extschema@.fhir_tracked t WHERE t.table_name = "table" RETURNING true INTO found_row;
    IF found_row IS NULL THEN
        PERFORM @extschema@.fhir_raise('not_tracked', "table"::text);
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS fhir_sync_capture ON %s', "table");
    IF discard_pending THEN
        DELETE FROM @extschema@.fhir_outbox o WHERE NOT o.processed AND o.resource_table = "table";
        GET DIAGNOSTICS discarded = ROW_COUNT;
    END IF;
    RETURN format('stopped tracking %s%s', "table",
                  CASE WHEN discard_pending THEN format(', discarded %s pending changes', discarded) ELSE '' END);
END
$fn$;

CREATE OR REPLACE FUNCTION fhir_backfill("table" regclass) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t          record;
    n          bigint;
BEGIN
    SELECT * INTO t FROM @extschema@.fhir_tracked x WHERE x.table_name = "table";
    IF t IS NULL THEN
        PERFORM @extschema@.fhir_raise('not_tracked', "table"::text);
    END IF;
    -- The keys are read by fhir_backfill_keys: as the table's owner, sandboxed (rendering a
    -- key as text runs its type's code), never with the caller's rights.
    IF t.parent_table IS NULL THEN
        INSERT INTO @extschema@.fhir_outbox (table_name, record_id, operation, resource_type, resource_table,
                                             resource_key, identifier_system, identifier_value)
        SELECT "table"::text, k.record_id, 'U', t.resource_type, "table", k.resource_key, k.identifier_system,
               k.identifier_value
          FROM @extschema@.fhir_backfill_keys("table"::oid) k;
    ELSE
        INSERT INTO @extschema@.fhir_outbox (table_name, record_id, operation, resource_type, resource_table, resource_key)
        SELECT "table"::text, k.record_id, 'U', t.resource_type, t.parent_table, k.resource_key
          FROM @extschema@.fhir_backfill_keys("table"::oid) k;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM @extschema@.fhir_sync_wake();
    RETURN n;
END
$fn$;

CREATE OR REPLACE FUNCTION fhir_requeue_dlq(ids bigint[]) RETURNS bigint
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

CREATE OR REPLACE FUNCTION fhir_requeue_dlq(
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

CREATE OR REPLACE FUNCTION fhir_cleanup_old(days integer DEFAULT 30)
RETURNS TABLE (outbox_deleted bigint, dlq_deleted bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF days IS NULL OR days < 0 THEN
        RAISE EXCEPTION 'days must be zero or more, not %', days USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM @extschema@.fhir_outbox o WHERE o.processed AND o.processed_at < now() - make_interval(days => days);
    GET DIAGNOSTICS outbox_deleted = ROW_COUNT;
    DELETE FROM @extschema@.fhir_dlq q WHERE q.last_failed_at < now() - make_interval(days => 3 * days);
    GET DIAGNOSTICS dlq_deleted = ROW_COUNT;
    RETURN NEXT;
END
$fn$;

-- fhir_sync_worker_slots() gains a column: a new function under the old name, the view moved
-- onto it (CREATE OR REPLACE VIEW keeps the view's grants), the old function's grants carried.
ALTER FUNCTION @extschema@.fhir_sync_worker_slots() RENAME TO fhir_sync_worker_slots_0_2;
CREATE FUNCTION @extschema@."fhir_sync_worker_slots"() RETURNS TABLE (
	"pid" INT,
	"database_oid" oid,
	"state" TEXT,
	"current_batch" bigint,
	"started_at" timestamp with time zone,
	"last_success_at" timestamp with time zone,
	"last_error_class" TEXT,
	"last_error_at" timestamp with time zone,
	"cycles" bigint
)
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_sync_worker_slots_wrapper';
REVOKE EXECUTE ON FUNCTION @extschema@.fhir_sync_worker_slots() FROM PUBLIC;
DO $carry$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT r.rolname
               FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a, pg_catalog.pg_roles r
              WHERE p.oid OPERATOR(pg_catalog.=) '@extschema@.fhir_sync_worker_slots_0_2()'::pg_catalog.regprocedure
                AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE' AND r.oid OPERATOR(pg_catalog.=) a.grantee
                AND a.grantee OPERATOR(pg_catalog.<>) p.proowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION @extschema@.fhir_sync_worker_slots() TO %I', g.rolname);
    END LOOP;
END
$carry$;

CREATE OR REPLACE VIEW fhir_sync_workers AS
SELECT w.pid, d.datname AS database, w.state, w.current_batch, w.started_at, w.last_success_at,
       w.last_error_class, w.last_error_at, w.cycles
  FROM @extschema@.fhir_sync_worker_slots() w
  LEFT JOIN pg_catalog.pg_database d ON d.oid = w.database_oid;

DROP FUNCTION @extschema@.fhir_sync_worker_slots_0_2();
