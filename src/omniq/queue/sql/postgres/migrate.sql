-- Creating and upgrading an OmniQ schema. The migrations themselves are the
-- schema_NNNN_*.sql files beside this one, applied in order, each once.

-- name: current_version
-- The schema version, without taking any lock: the fast path once migrated.
SELECT coalesce(max(version), 0) FROM {schema}.schema_version;

-- name: lock
-- Serializes migrations of one schema across processes (released at commit).
-- The two-key form keeps clear of applications' one-key advisory locks.
SELECT pg_advisory_xact_lock(hashtext('omniq.migrate'), hashtext('{schema}'));

-- name: create_version_table
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: record_version
INSERT INTO {schema}.schema_version (version) VALUES ($1);
