-- fhir_sync 0.4.0 → 0.5.0. Released scripts are never edited; this one carries a 0.4.0 database
-- to what a fresh 0.5.0 install defines (tests/e2e/test_upgrade.py compares the two).
--
-- 0.5.0, for the servers hospitals write to:
-- - one source row, one resource: the worker looks up which rows already map to an identifier or
--   a resource id before it sends (two indexes on fhir_sync_state);
-- - SMART Backend Services: fhir_sync_jwks() prints the public keys to register with the EHR;
-- - write modes: fhir_tracked.write_mode, and fhir_track(write_mode => …), for servers without
--   update-as-create or that take no update at all;
-- - fhir_sync_server: the server's CapabilityStatement as the workers read it;
-- - fhir_sync_state keeps room on its pages, so that a delivery's update of a row is HOT.

CREATE INDEX fhir_sync_state_identifier_idx ON @extschema@.fhir_sync_state (identifier_value, identifier_system)
    WHERE NOT deleted;
-- Which rows map to a resource id (a delete or update of a resource another row still maps to is
-- refused).
CREATE INDEX fhir_sync_state_fhir_id_idx ON @extschema@.fhir_sync_state (fhir_id) WHERE NOT deleted;
-- (Pages written from now on; existing ones gain the room as vacuum frees it.)
ALTER TABLE @extschema@.fhir_sync_state SET (fillfactor = 70);

CREATE FUNCTION @extschema@."fhir_sync_jwks"() RETURNS jsonb
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_sync_jwks_wrapper';
REVOKE EXECUTE ON FUNCTION @extschema@.fhir_sync_jwks() FROM PUBLIC;

ALTER TABLE @extschema@.fhir_tracked ADD COLUMN write_mode text
    CHECK (write_mode IN ('upsert', 'create', 'create_only'));

-- fhir_track gained an argument (write_mode). The new one is sql/track.sql's, as a fresh install
-- defines it; the old one goes once the grants a DBA gave on it carry over.
CREATE FUNCTION @extschema@.fhir_track(
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
REVOKE EXECUTE ON FUNCTION @extschema@.fhir_track(regclass, text, regprocedure, name, text, text, boolean, text)
    FROM PUBLIC;
DO $carry$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT r.rolname
               FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a, pg_catalog.pg_roles r
              WHERE p.oid OPERATOR(pg_catalog.=) '@extschema@.fhir_track(regclass, text, regprocedure, name, text, text, boolean)'::pg_catalog.regprocedure
                AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE' AND r.oid OPERATOR(pg_catalog.=) a.grantee
                AND a.grantee OPERATOR(pg_catalog.<>) p.proowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION @extschema@.fhir_track(regclass, text, regprocedure, name, text, text, boolean, text) TO %I', g.rolname);
    END LOOP;
END
$carry$;
DROP FUNCTION @extschema@.fhir_track(regclass, text, regprocedure, name, text, text, boolean);

-- fhir_sync_server: the server's CapabilityStatement as the workers read it (views.sql).
CREATE FUNCTION @extschema@."fhir_sync_server_capabilities"() RETURNS jsonb
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_sync_server_capabilities_wrapper';
REVOKE EXECUTE ON FUNCTION @extschema@.fhir_sync_server_capabilities() FROM PUBLIC;

-- What the FHIR server's CapabilityStatement says, for the tracked resource types, and what the
-- workers do about it (notes): conditional creates where it takes no update-as-create, no
-- If-Match where it does not honour versions, single requests where it takes no Bundle.
CREATE VIEW @extschema@.fhir_sync_server AS
SELECT c OPERATOR(pg_catalog.->>) 'server_url' AS server_url,
       (c OPERATOR(pg_catalog.->>) 'read_at')::timestamptz AS read_at,
       c OPERATOR(pg_catalog.->>) 'fhir_version' AS fhir_version,
       c OPERATOR(pg_catalog.->>) 'software' AS software,
       (c OPERATOR(pg_catalog.->>) 'batch')::boolean AS batch,
       (c OPERATOR(pg_catalog.->>) 'transaction')::boolean AS transaction,
       c OPERATOR(pg_catalog.->) 'resources' AS resources,
       ARRAY(SELECT pg_catalog.jsonb_array_elements_text(c OPERATOR(pg_catalog.->) 'notes')) AS notes
  FROM @extschema@.fhir_sync_server_capabilities() AS c
 WHERE c IS NOT NULL;
REVOKE ALL ON @extschema@.fhir_sync_server FROM PUBLIC;
