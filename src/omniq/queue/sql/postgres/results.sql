-- The result storage's statements (PostgreSQLResultStorage). Storing results
-- notifies '{schema}.results' with the task ids, comma-separated (an empty
-- payload, when they do not fit in one notification, means "look again").

-- name: set_many
WITH stored AS (
    INSERT INTO {schema}.results (task_id, payload, expires_at)
    SELECT r.task_id, r.payload, now() + r.ttl * interval '1 second'
    FROM unnest($1::text[], $2::bytea[], $3::float8[]) AS r(task_id, payload, ttl)
    ON CONFLICT (task_id) DO UPDATE
    SET payload = EXCLUDED.payload, expires_at = EXCLUDED.expires_at
    RETURNING task_id
)
SELECT pg_notify('{schema}.results', CASE WHEN length(ids) <= 7900 THEN ids ELSE '' END)
FROM (SELECT string_agg(task_id, ',') AS ids FROM stored) s;

-- name: insert_many
-- set_many when no result exists yet for these tasks (the common case): a plain
-- INSERT, cheaper than an upsert. An existing one makes it fail with a unique
-- violation (having changed nothing), and the caller falls back to set_many.
WITH stored AS (
    INSERT INTO {schema}.results (task_id, payload, expires_at)
    SELECT r.task_id, r.payload, now() + r.ttl * interval '1 second'
    FROM unnest($1::text[], $2::bytea[], $3::float8[]) AS r(task_id, payload, ttl)
)
SELECT pg_notify('{schema}.results', $4::text);

-- name: get
SELECT payload FROM {schema}.results
WHERE task_id = $1 AND (expires_at IS NULL OR expires_at > now());

-- name: delete
DELETE FROM {schema}.results WHERE task_id = $1;

-- name: prune
-- Expired rows are invisible to get already; deleting them bounds the table.
DELETE FROM {schema}.results
WHERE task_id = ANY (ARRAY(
    SELECT task_id FROM {schema}.results WHERE expires_at <= now() LIMIT $1));
