-- fhir_sync tables. Owned by the role that ran CREATE EXTENSION; no privileges are granted to
-- PUBLIC (see privileges.sql), so ordinary roles see none of this unless a DBA grants it.

-- What is tracked and how it maps. One row per tracked table; fhir_track() writes it.
CREATE TABLE fhir_tracked (
    table_name        regclass    PRIMARY KEY,
    resource_type     text        NOT NULL,
    -- A name from the mapper registry (fhir_mapper_names(); the CHECK is added in track.sql,
    -- once that function exists).
    mapper            text        NOT NULL,
    key_column        name        NOT NULL,
    -- Child tables (patient_other_identifiers) belong to a parent row: their changes are
    -- changes of the parent resource.
    parent_table      regclass,
    parent_column     name,
    map_function      regprocedure,
    identifier_column name,
    identifier_system text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- A superuser accepted this owner for map_function although it is not the table's owner
    -- (fhir_track(..., function_owner_trusted => true)); NULL: only the table's owner will do.
    -- (Last: 0.2.0 added it, and an upgraded table must look like a new one.)
    map_function_owner regrole,
    -- How its resources are written (upsert, create, create_only); NULL: fhir_sync.write_mode.
    -- (Last: 0.5.0 added it.)
    write_mode        text        CHECK (write_mode IN ('upsert', 'create', 'create_only')),
    CHECK ((parent_table IS NULL) = (parent_column IS NULL)),
    CHECK ((mapper = 'function') = (map_function IS NOT NULL))
);

-- One row per captured change, written by the capture trigger in the writer's transaction.
-- The worker reads the source rows as they stand at send time, so several pending changes of
-- one resource (resource_table, resource_key) collapse into one request.
CREATE TABLE fhir_outbox (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid              bigint      NOT NULL DEFAULT txid_current(),
    table_name        text        NOT NULL,
    record_id         text        NOT NULL,
    -- I, U or D. No CHECK constraint: only the capture trigger writes it, and a CHECK is
    -- re-prepared for every row the trigger inserts (14 % of capture time).
    operation         char(1)     NOT NULL,
    resource_type     text        NOT NULL,
    resource_table    regclass    NOT NULL,
    resource_key      text        NOT NULL,
    payload_json      jsonb,
    identifier_system text,
    identifier_value  text,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    processed         boolean     NOT NULL DEFAULT false,
    processed_at      timestamptz,
    attempts          integer     NOT NULL DEFAULT 0,
    next_retry_at     timestamptz,
    locked_by         integer,
    lock_expires_at   timestamptz,
    fhir_resource_id  text,
    fhir_version      text,
    last_error        text,
    error_class       text,
    http_status       integer,
    first_failed_at   timestamptz
-- No fillfactor: a row is written once by the capture and leaves the table when it is delivered
-- (a retry rewrites it, rarely). The leases are in shared memory (src/worker/lease.rs).
);

-- Claiming walks this index from the front: fresh changes (no retry time) first, then retries
-- that came due. Its size is the pending backlog only, so a claim costs the same with a
-- thousand or a million processed rows behind it.
CREATE INDEX fhir_outbox_pending_idx ON fhir_outbox (next_retry_at NULLS FIRST, id) WHERE NOT processed;
-- Per-resource lookups: is another worker holding this resource, is it backing off, which
-- pending rows does one request settle.
CREATE INDEX fhir_outbox_resource_idx ON fhir_outbox (resource_table, resource_key) WHERE NOT processed;

-- Delivered changes, moved here from fhir_outbox by the settle that recorded them: what a DBA
-- reads to see what went out recently, emptied by age with fhir_cleanup_old(). UNLOGGED: a
-- delivered change then costs the primary a heap delete in the WAL (~60 bytes), not a new
-- version of its row with index entries (~330 bytes, docs/delivery.md). The price: a crash or
-- an immediate shutdown empties it, it is not on standbys, and pg_dump skips it (it skipped the
-- delivered history before). The record of a delivery is the FHIR server and fhir_sync_state.
-- No payload and no identifier: the history names source rows by key only.
CREATE UNLOGGED TABLE fhir_outbox_delivered (
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
CREATE INDEX fhir_outbox_delivered_processed_at_idx ON fhir_outbox_delivered (processed_at);

-- Changes that cannot be delivered, moved here from fhir_outbox with the reason (one row per
-- resource and failure; outbox_ids lists the collapsed changes).
CREATE TABLE fhir_dlq (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_ids         bigint[]    NOT NULL,
    txid               bigint,
    table_name         text        NOT NULL,
    record_id          text        NOT NULL,
    operation          char(1)     NOT NULL,
    resource_type      text        NOT NULL,
    resource_table     regclass    NOT NULL,
    resource_key       text        NOT NULL,
    payload_json       jsonb,
    identifier_system  text,
    identifier_value   text,
    error_class        text        NOT NULL,
    error              text        NOT NULL,
    http_status        integer,
    operation_outcome  jsonb,
    attempts           integer     NOT NULL DEFAULT 0,
    first_failed_at    timestamptz NOT NULL DEFAULT now(),
    last_failed_at     timestamptz NOT NULL DEFAULT now(),
    requeued           boolean     NOT NULL DEFAULT false,
    requeued_at        timestamptz,
    requeued_outbox_id bigint
);
CREATE INDEX fhir_dlq_last_failed_idx ON fhir_dlq (last_failed_at);
CREATE INDEX fhir_dlq_pending_idx ON fhir_dlq (resource_table, resource_key) WHERE NOT requeued;

-- What the FHIR server holds for each source row: lets updates and deletes address the
-- resource by id, and references point at Patient/<id>.
CREATE TABLE fhir_sync_state (
    resource_table    regclass    NOT NULL,
    resource_key      text        NOT NULL,
    resource_type     text        NOT NULL,
    fhir_id           text,
    fhir_version      text,
    identifier_system text,
    identifier_value  text,
    deleted           boolean     NOT NULL DEFAULT false,
    last_synced_at    timestamptz NOT NULL DEFAULT now(),
    last_outbox_id    bigint,
    PRIMARY KEY (resource_table, resource_key)
-- A delivery rewrites its row only when what the row maps to changes (a first write, a new id,
-- a delete, another identifier); a version alone goes to fhir_sync_version. With room on the
-- page the rewrite is HOT (benches/README.md, walsim: 710 → 575 bytes per change).
) WITH (fillfactor = 70);

-- Which rows already map to an identifier (one source row, one resource: a second row with
-- the same MRN is dead-lettered, not merged into the first row's resource). Keyed by a 64-bit hash
-- of value and system (the system's hash seeds the value's: no separator that a system or value
-- could contain), not by the text: a first write enters this index twice (its reservation, then
-- the settle that gives the row its id), and a bigint entry is ~30 bytes of WAL smaller than a text
-- one (docs/delivery.md §6). The reader compares the columns too: a collision costs a lookup, never
-- a wrong holder. It spells the expression exactly (src/source.rs), or the index is not used.
CREATE INDEX fhir_sync_state_identifier_idx ON fhir_sync_state
    (pg_catalog.hashtextextended(identifier_value, pg_catalog.hashtextextended(identifier_system, 0)))
    WHERE NOT deleted;
-- Which rows map to a resource id (a delete or update of a resource another row still maps to is
-- refused). Hashed likewise; a reservation (no id yet) has no entry.
CREATE INDEX fhir_sync_state_fhir_id_idx ON fhir_sync_state (pg_catalog.hashtextextended(fhir_id, 0))
    WHERE fhir_id IS NOT NULL AND NOT deleted;

-- The version the FHIR server gave a resource's last write (If-Match on the next one), with when
-- and by which change, for every update but a first write or a delete (those
-- rewrite fhir_sync_state, which takes their version). Written by nearly every delivery, so it is
-- UNLOGGED: no WAL. The reader takes the version of whichever of the two rows a later settle wrote.
-- A crash empties it; where the server has moved on since fhir_sync_state's version, its 412 (or
-- 409) makes the worker read the current version and send again (core/src/send.rs): one GET more
-- per resource, once. fhir_sync_resources shows the two together.
CREATE UNLOGGED TABLE fhir_sync_version (
    resource_table    regclass    NOT NULL,
    resource_key      text        NOT NULL,
    fhir_version      text,
    synced_at         timestamptz NOT NULL,
    outbox_id         bigint,
    PRIMARY KEY (resource_table, resource_key)
) WITH (fillfactor = 70);

-- pg_dump keeps what a user's database holds in these tables: tracking configuration, sync state
-- (which FHIR id each row addresses), changes not yet delivered, dead letters. Not the delivered
-- history (fhir_outbox_delivered): it would carry the keys of rows deleted since into every dump;
-- nor the version cache (fhir_sync_version): a restored copy reads versions anew. The identity
-- sequences too: restored ids must not be handed out again.
SELECT pg_catalog.pg_extension_config_dump('fhir_tracked', '');
SELECT pg_catalog.pg_extension_config_dump('fhir_sync_state', '');
SELECT pg_catalog.pg_extension_config_dump('fhir_outbox', 'WHERE NOT processed');
SELECT pg_catalog.pg_extension_config_dump('fhir_outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('fhir_dlq', '');
SELECT pg_catalog.pg_extension_config_dump('fhir_dlq_id_seq', '');
