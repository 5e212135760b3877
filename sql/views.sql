-- What a DBA watches: views over the outbox, the DLQ and the workers' shared-memory counters.
-- Counters reset at server restart or with SELECT fhir_sync_reset_stats().

CREATE VIEW fhir_sync_workers AS
SELECT w.pid, d.datname AS database, w.state, w.current_batch, w.started_at, w.last_success_at,
       w.last_error_class, w.last_error_at, w.cycles
  FROM @extschema@.fhir_sync_worker_slots() w
  LEFT JOIN pg_catalog.pg_database d ON d.oid = w.database_oid;

CREATE VIEW fhir_sync_status AS
WITH pending AS (
    SELECT pg_catalog.count(*) AS n, pg_catalog.min(created_at) AS oldest
      FROM @extschema@.fhir_outbox WHERE NOT processed
)
SELECT p.n AS unprocessed,
       coalesce(extract(epoch FROM pg_catalog.clock_timestamp() - p.oldest), 0)::float8 AS lag_seconds,
       s.processed_total,
       s.failed_total,
       (SELECT pg_catalog.count(*) FROM @extschema@.fhir_dlq WHERE NOT requeued) AS dlq_size,
       s.dead_lettered_total,
       s.calls_total AS fhir_calls,
       s.call_errors_total AS fhir_call_errors,
       s.latency_p50_seconds,
       s.latency_p90_seconds,
       s.latency_p99_seconds,
       (SELECT pg_catalog.count(*) FROM @extschema@.fhir_sync_workers) AS workers,
       (SELECT pg_catalog.string_agg(DISTINCT state, ', ') FROM @extschema@.fhir_sync_workers) AS worker_state,
       s.paused_reason,
       s.stats_reset
  FROM pending p, @extschema@.fhir_sync_stats() s;

-- Per source table and resource type. lag_seconds is the age of the oldest pending change;
-- processed counts the delivered history (fhir_outbox_delivered, since the last fhir_cleanup_old
-- and the last crash).
CREATE VIEW fhir_sync_tables AS
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

-- Per source row: what fhir_sync_state maps it to, with the version and time of its last delivered
-- write: the version cache's (fhir_sync_version) where a later settle wrote it. After a crash
-- emptied the cache, the version of the row's last durable write, until its next update. On a
-- standby the cache cannot be read (it is unlogged): use fhir_sync_state there.
CREATE VIEW fhir_sync_resources AS
SELECT s.resource_table, s.resource_key, s.resource_type, s.fhir_id,
       CASE WHEN v.synced_at >= s.last_synced_at THEN v.fhir_version ELSE s.fhir_version END AS fhir_version,
       s.identifier_system, s.identifier_value, s.deleted,
       GREATEST(s.last_synced_at, v.synced_at) AS last_synced_at,
       GREATEST(s.last_outbox_id, v.outbox_id) AS last_outbox_id
  FROM @extschema@.fhir_sync_state s
  LEFT JOIN @extschema@.fhir_sync_version v
         ON v.resource_table OPERATOR(pg_catalog.=) s.resource_table
        AND v.resource_key OPERATOR(pg_catalog.=) s.resource_key;

-- Pending changes grouped by the transaction that made them (the seed connector's view).
CREATE VIEW fhir_pending_transactions AS
SELECT txid,
       pg_catalog.count(*) AS changes,
       pg_catalog.array_agg(DISTINCT table_name) AS tables,
       pg_catalog.min(created_at) AS first_change_at,
       pg_catalog.max(attempts) AS max_attempts,
       extract(epoch FROM pg_catalog.clock_timestamp() - pg_catalog.min(created_at))::float8 AS age_seconds
  FROM @extschema@.fhir_outbox
 WHERE NOT processed
 GROUP BY txid;

-- One row per sample, in the shape exporters want. Names match the seed connector's metrics.
CREATE VIEW fhir_sync_metrics AS
WITH st AS (SELECT * FROM @extschema@.fhir_sync_status)
SELECT 'fhir_outbox_unprocessed_count'::text AS name, '{}'::jsonb AS labels, unprocessed::float8 AS value FROM st
UNION ALL SELECT 'fhir_outbox_lag_seconds', '{}', lag_seconds FROM st
UNION ALL SELECT 'fhir_connector_processed_total', '{}', processed_total::float8 FROM st
UNION ALL SELECT 'fhir_connector_failed_total', '{}', failed_total::float8 FROM st
UNION ALL SELECT 'fhir_dlq_total', '{}', dlq_size::float8 FROM st
UNION ALL SELECT 'fhir_call_errors_total', pg_catalog.jsonb_build_object('error_class', e.error_class), e.count::float8
            FROM @extschema@.fhir_sync_call_errors() e
UNION ALL SELECT 'fhir_call_latency_seconds_bucket',
                 pg_catalog.jsonb_build_object('le', CASE WHEN h.le = 'Infinity' THEN '+Inf' ELSE h.le::text END), h.count::float8
            FROM @extschema@.fhir_sync_latency_histogram() h
UNION ALL SELECT 'fhir_call_latency_seconds_sum', '{}', s.latency_sum_seconds FROM @extschema@.fhir_sync_stats() s
UNION ALL SELECT 'fhir_call_latency_seconds_count', '{}', fhir_calls::float8 FROM st
UNION ALL SELECT 'fhir_sync_workers', pg_catalog.jsonb_build_object('state', w.state), pg_catalog.count(*)::float8
            FROM @extschema@.fhir_sync_workers w GROUP BY w.state
UNION ALL SELECT 'fhir_outbox_table_pending', pg_catalog.jsonb_build_object('table', t.table_name, 'resource_type', t.resource_type), t.pending::float8
            FROM @extschema@.fhir_sync_tables t;

-- What the FHIR server's CapabilityStatement says, for the tracked resource types, and what the
-- workers do about it (notes): conditional creates where it takes no update-as-create, no
-- If-Match where it does not honour versions, single requests where it takes no Bundle.
CREATE VIEW fhir_sync_server AS
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
