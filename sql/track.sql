-- Starting and stopping capture. The trigger itself is Rust (fhir_capture); these functions
-- only decide how a table maps and install it. search_path is pinned and every name is
-- qualified, so a planted function or operator cannot change what they do.

-- fhir_tracked.mapper holds a name of the mapper registry (fhir_sync_core's mapping::registry).
ALTER TABLE fhir_tracked ADD CONSTRAINT fhir_tracked_mapper_check
    CHECK (mapper = ANY (@extschema@.fhir_mapper_names()));

-- The table a reference column of "table" points at: the column's foreign key target, or else
-- the tracked table of that mapper with the same owner (another owner's rows are not ours to
-- point at). The one statement of this rule: fhir_track, the worker and the mappers use it.
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

-- Who may track: a role that can act as the table's owner (the worker will run the owner's
-- code as that owner). A mapping function must take exactly the table's row type, return jsonb
-- (or json), and belong to the table's owner: its owner's code then runs with the table owner's
-- rights. Only a superuser may accept another owner, explicitly (function_owner_trusted).
CREATE FUNCTION fhir_track(
    "table"           regclass,
    resource_type     text,
    map_function      regprocedure DEFAULT NULL,
    identifier_column name DEFAULT NULL,
    identifier_system text DEFAULT NULL,
    mapper            text DEFAULT NULL,
    function_owner_trusted boolean DEFAULT false,
    write_mode        text DEFAULT NULL
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
    IF write_mode IS NOT NULL AND NOT (write_mode = ANY (ARRAY['upsert', 'create', 'create_only'])) THEN
        RAISE EXCEPTION 'unknown write mode "%"', write_mode USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use upsert, create or create_only, or pass NULL for fhir_sync.write_mode.';
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
                                               map_function_owner, write_mode)
    VALUES ("table", fhir_track.resource_type, chosen, key_col, parent, parent_col, fhir_track.map_function,
            fhir_track.identifier_column, fhir_track.identifier_system, fn_owner, fhir_track.write_mode)
    ON CONFLICT ON CONSTRAINT fhir_tracked_pkey DO UPDATE SET
        resource_type = excluded.resource_type, mapper = excluded.mapper, key_column = excluded.key_column,
        parent_table = excluded.parent_table, parent_column = excluded.parent_column,
        map_function = excluded.map_function, identifier_column = excluded.identifier_column,
        identifier_system = excluded.identifier_system,
        map_function_owner = excluded.map_function_owner, write_mode = excluded.write_mode;

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

CREATE FUNCTION fhir_untrack("table" regclass, discard_pending boolean DEFAULT false) RETURNS text
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

-- Enqueues every existing row of a tracked table, e.g. after tracking a table that already
-- has data. Child-table rows enqueue their parents once each.
CREATE FUNCTION fhir_backfill("table" regclass) RETURNS bigint
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
