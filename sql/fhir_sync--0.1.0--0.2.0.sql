-- fhir_sync 0.1.0 → 0.2.0: the trust boundary (SECURITY.md).
-- Released upgrade scripts are never edited; a later change ships a script of its own.
\echo Use "ALTER EXTENSION fhir_sync UPDATE" to load this file. \quit

-- A superuser may accept a mapping function owner other than the table's (fhir_track).
ALTER TABLE @extschema@.fhir_tracked ADD COLUMN map_function_owner regrole;

-- fhir_track checks who tracks and which mapping function; it gained an argument. The new one is
-- created next to the old, which is dropped at the end, once its grants are carried over.
CREATE FUNCTION fhir_track(
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
    ext_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                        WHERE e.extname = 'fhir_sync');
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
        RAISE EXCEPTION 'table % has no single-column primary key', "table"
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'Add a primary key on one column: fhir_sync addresses rows by it.';
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
        chosen := CASE
            WHEN resource_type = 'Patient' AND cols @> ARRAY['identifier_value', 'identifier_system']
                 AND cols && ARRAY['name_family', 'name_given', 'name_text', 'birth_date'] THEN 'patient'
            WHEN resource_type = 'Patient' AND cols @> ARRAY['patient_id', 'identifier_value'] THEN 'patient_identifier'
            WHEN resource_type = 'Encounter' AND cols @> ARRAY['patient_id', 'encounter_date'] THEN 'encounter'
            WHEN resource_type = 'Observation' AND cols @> ARRAY['patient_id', 'systolic_pressure', 'diastolic_pressure'] THEN 'blood_pressure'
            WHEN resource_type = 'Observation' AND cols @> ARRAY['patient_id', 'rate'] THEN 'pulse'
        END;
        IF chosen IS NULL THEN
            RAISE EXCEPTION 'table % has no built-in % mapping', "table", resource_type
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = format('Pass a function that turns a row into the resource: SELECT fhir_track(%L, %L, map_function => ''my_mapper(%s)''::regprocedure).',
                                    "table"::text, resource_type, "table"::text);
        END IF;
    END IF;
    IF chosen NOT IN ('patient', 'patient_identifier', 'encounter', 'blood_pressure', 'pulse', 'function') THEN
        RAISE EXCEPTION 'unknown mapper "%"', chosen USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use patient, patient_identifier, encounter, blood_pressure, pulse, or pass map_function.';
    END IF;
    IF identifier_column IS NOT NULL AND NOT (identifier_column::text = ANY (cols)) THEN
        RAISE EXCEPTION 'table % has no column "%"', "table", identifier_column USING ERRCODE = 'undefined_column';
    END IF;

    IF chosen = 'patient_identifier' THEN
        parent_col := 'patient_id';
        -- The foreign key says which table the identifiers belong to; without one, the tracked
        -- Patient table does.
        SELECT c.confrelid::regclass INTO parent
          FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
         WHERE c.conrelid = "table" AND c.contype = 'f' AND a.attname = parent_col LIMIT 1;
        IF parent IS NULL THEN
            -- Only a patient table of the same owner: another owner's Patients are not ours to add to.
            EXECUTE format('SELECT min(t.table_name::text)::regclass FROM %I.fhir_tracked t JOIN pg_class c ON c.oid = t.table_name
                             WHERE t.mapper = ''patient'' AND c.relowner = $1', ext_schema)
               USING owner INTO parent;
        END IF;
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

    EXECUTE format($q$
        INSERT INTO %I.fhir_tracked AS t (table_name, resource_type, mapper, key_column, parent_table,
                                          parent_column, map_function, identifier_column, identifier_system,
                                          map_function_owner)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT (table_name) DO UPDATE SET
            resource_type = excluded.resource_type, mapper = excluded.mapper, key_column = excluded.key_column,
            parent_table = excluded.parent_table, parent_column = excluded.parent_column,
            map_function = excluded.map_function, identifier_column = excluded.identifier_column,
            identifier_system = excluded.identifier_system,
            map_function_owner = excluded.map_function_owner$q$, ext_schema)
    USING "table", resource_type, chosen, key_col, parent, parent_col, map_function, identifier_column, identifier_system,
          fn_owner;

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


-- fhir_backfill reads keys through fhir_backfill_keys (as the table's owner, sandboxed).
CREATE FUNCTION @extschema@."fhir_backfill_keys"(
	"table" oid
) RETURNS TABLE (
	"record_id" TEXT,
	"resource_key" TEXT,
	"identifier_system" TEXT,
	"identifier_value" TEXT
)
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_backfill_keys_wrapper';

CREATE OR REPLACE FUNCTION fhir_backfill("table" regclass) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    ext_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                        WHERE e.extname = 'fhir_sync');
    t          record;
    n          bigint;
BEGIN
    EXECUTE format('SELECT * FROM %I.fhir_tracked WHERE table_name = $1', ext_schema) USING "table" INTO t;
    IF t IS NULL THEN
        RAISE EXCEPTION 'table % is not tracked by fhir_sync', "table" USING ERRCODE = 'no_data_found',
            HINT = 'Start tracking it with SELECT fhir_track(''table'', ''ResourceType'').';
    END IF;
    -- The keys are read by fhir_backfill_keys: as the table's owner, sandboxed (rendering a
    -- key as text runs its type's code), never with the caller's rights.
    IF t.parent_table IS NULL THEN
        EXECUTE format($q$
            INSERT INTO %I.fhir_outbox (table_name, record_id, operation, resource_type, resource_table,
                                        resource_key, identifier_system, identifier_value)
            SELECT $1, k.record_id, 'U', $2, $3, k.resource_key, k.identifier_system, k.identifier_value
              FROM %I.fhir_backfill_keys($3::pg_catalog.oid) k$q$, ext_schema, ext_schema)
        USING "table"::text, t.resource_type, "table";
    ELSE
        EXECUTE format($q$
            INSERT INTO %I.fhir_outbox (table_name, record_id, operation, resource_type, resource_table, resource_key)
            SELECT $1, k.record_id, 'U', $2, $3, k.resource_key FROM %I.fhir_backfill_keys($4::pg_catalog.oid) k$q$,
            ext_schema, ext_schema)
        USING "table"::text, t.resource_type, t.parent_table, "table";
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    EXECUTE format('SELECT %I.fhir_sync_wake()', ext_schema);
    RETURN n;
END
$fn$;

-- The mappers are Rust now (no name is looked up when they run), render the row sandboxed, and
-- are not parallel safe (the sandbox opens a subtransaction); fhir_map_row likewise.
CREATE OR REPLACE FUNCTION @extschema@."fhir_patient_json"(
	"p" anyelement
) RETURNS jsonb
STRICT STABLE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_patient_json_wrapper';
CREATE OR REPLACE FUNCTION @extschema@."fhir_encounter_json"(
	"f" anyelement
) RETURNS jsonb
STRICT STABLE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_encounter_json_wrapper';
CREATE OR REPLACE FUNCTION @extschema@."fhir_observation_json"(
	"o" anyelement
) RETURNS jsonb
STRICT STABLE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'fhir_observation_json_wrapper';
ALTER FUNCTION @extschema@.fhir_map_row(text, oid, jsonb) PARALLEL UNSAFE;

-- What a dedicated worker role needs (fhir_sync.username).
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

-- PUBLIC gets nothing that changes state, exposes the workers or wakes them.
REVOKE EXECUTE ON FUNCTION
    @extschema@.fhir_track(regclass, text, regprocedure, name, text, text, boolean),
    @extschema@.fhir_backfill_keys(oid),
    @extschema@.fhir_sync_wake(),
    @extschema@.fhir_sync_stats(),
    @extschema@.fhir_sync_worker_slots(),
    @extschema@.fhir_sync_latency_histogram(),
    @extschema@.fhir_sync_call_errors(),
    @extschema@.fhir_sync_grant_worker(regrole)
FROM PUBLIC;

-- Grants a DBA gave carry over: the old fhir_track's to the new one, and fhir_backfill's to
-- fhir_backfill_keys, which it now calls.
DO $carry$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT r.rolname, x.target
               FROM (VALUES ('@extschema@.fhir_track(regclass, text, regprocedure, name, text, text)',
                             '@extschema@.fhir_track(regclass, text, regprocedure, name, text, text, boolean)'),
                            ('@extschema@.fhir_backfill(regclass)', '@extschema@.fhir_backfill_keys(oid)')) AS x(source, target),
                    pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a, pg_catalog.pg_roles r
              WHERE p.oid OPERATOR(pg_catalog.=) x.source::pg_catalog.regprocedure
                AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE' AND r.oid OPERATOR(pg_catalog.=) a.grantee
                AND a.grantee OPERATOR(pg_catalog.<>) p.proowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', g.target, g.rolname);
    END LOOP;
END
$carry$;
DROP FUNCTION @extschema@.fhir_track(regclass, text, regprocedure, name, text, text);

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

-- 0.2.0 runs a mapping function only while the table's owner owns it. Say which tracks 0.1.0
-- accepted otherwise: their changes are dead-lettered until the table is tracked again.
DO $check$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT x.table_name, x.map_function FROM @extschema@.fhir_tracked x
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) x.table_name
               JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) x.map_function
              WHERE p.proowner OPERATOR(pg_catalog.<>) c.relowner
    LOOP
        RAISE WARNING 'mapping function % of table % is not owned by the table''s owner', t.map_function, t.table_name
            USING HINT = 'Make the table''s owner its owner, or, as a superuser, track the table again with function_owner_trusted => true.';
    END LOOP;
END
$check$;
