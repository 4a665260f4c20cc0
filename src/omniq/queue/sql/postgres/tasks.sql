-- The task queue's statements (PostgreSQLTaskQueue), one round trip each.
-- Times cross the wire as Unix seconds (float8); the table keeps timestamptz
-- and every "now" is the server's, so hosts never compare their own clocks.
-- Statements that make work available notify the channel '{schema}.tasks'
-- with the queue name; the notification is delivered at commit.

-- name: put
-- Insert new tasks, skipping known ids; returns the ids inserted.
WITH new AS (
    INSERT INTO {schema}.tasks (id, queue, priority, due_at, state, payload)
    SELECT r.id, r.queue, r.priority, to_timestamp(r.due_at),
           CASE WHEN to_timestamp(r.due_at) <= now() THEN 'ready' ELSE 'scheduled' END,
           r.payload
    FROM unnest($1::text[], $2::text[], $3::integer[], $4::float8[], $5::bytea[])
         WITH ORDINALITY AS r(id, queue, priority, due_at, payload, n)
    ORDER BY r.n
    ON CONFLICT (id) DO NOTHING
    RETURNING id, queue
)
SELECT array_agg(new.id) AS inserted,
       (SELECT count(pg_notify('{schema}.tasks', q.queue))
        FROM (SELECT DISTINCT queue FROM new) q) AS notified
FROM new;

-- name: put_new
-- put for a batch none of whose ids is known, the common case: a plain INSERT,
-- about 15% cheaper than one with ON CONFLICT. A known id makes it fail with
-- a unique violation (having changed nothing), and the caller falls back to
-- put. $6 lists the batch's queues, to notify.
WITH new AS (
    INSERT INTO {schema}.tasks (id, queue, priority, due_at, state, payload)
    SELECT r.id, r.queue, r.priority, to_timestamp(r.due_at),
           CASE WHEN to_timestamp(r.due_at) <= now() THEN 'ready' ELSE 'scheduled' END,
           r.payload
    FROM unnest($1::text[], $2::text[], $3::integer[], $4::float8[], $5::bytea[])
         AS r(id, queue, priority, due_at, payload)
)
SELECT count(pg_notify('{schema}.tasks', q)) FROM unnest($6::text[]) AS q;

-- name: put_one
-- put for a single task (the common enqueue), without the arrays: returns 1 if
-- inserted, 0 if the id was known.
WITH new AS (
    INSERT INTO {schema}.tasks (id, queue, priority, due_at, state, payload)
    VALUES ($1, $2, $3, to_timestamp($4),
            CASE WHEN to_timestamp($4) <= now() THEN 'ready' ELSE 'scheduled' END, $5)
    ON CONFLICT (id) DO NOTHING
    RETURNING queue
)
SELECT count(pg_notify('{schema}.tasks', queue)) FROM new;

-- name: claim
-- See the claim() function in schema_0001_initial.sql.
SELECT id, payload, attempts, due_at, error
FROM {schema}.claim($1::text[], $2::integer, $3::float8, $4::text);

-- name: next_wake
-- Seconds until work may become claimable without a notification: the
-- earliest due time of a scheduled task or lease end of a running one
-- (NULL: neither exists). Measured on the server's clock.
SELECT extract(epoch FROM least(
    (SELECT min(due_at) FROM {schema}.tasks WHERE state = 'scheduled'),
    (SELECT min(lease_until) FROM {schema}.tasks WHERE state = 'running')) - now())::float8;

-- name: finish
-- Final status for tasks still leased under the given lease ids (NULL: any lease).
UPDATE {schema}.tasks t
SET state = $3, error = $4, lease_id = NULL, lease_until = NULL, finished_at = now()
FROM unnest($1::text[], $2::text[]) AS r(id, lease_id)
WHERE t.id = r.id AND t.state = 'running' AND (r.lease_id IS NULL OR t.lease_id = r.lease_id)
RETURNING t.id;

-- name: retry
-- A leased task becomes pending again, due at $3, keeping its attempts.
WITH retried AS (
    UPDATE {schema}.tasks
    SET state = CASE WHEN to_timestamp($3) <= now() THEN 'ready' ELSE 'scheduled' END,
        due_at = to_timestamp($3), error = $4, lease_id = NULL, lease_until = NULL
    WHERE id = $1 AND state = 'running' AND ($2::text IS NULL OR lease_id = $2)
    RETURNING queue
)
SELECT count(pg_notify('{schema}.tasks', queue)) FROM retried;

-- name: release
-- Leased tasks that never started go back, their claim's attempt taken back.
WITH released AS (
    UPDATE {schema}.tasks t
    SET state = 'ready', attempts = t.attempts - 1, lease_id = NULL, lease_until = NULL
    FROM unnest($1::text[], $2::text[]) AS r(id, lease_id)
    WHERE t.id = r.id AND t.state = 'running'
      AND (r.lease_id IS NULL OR t.lease_id = r.lease_id)
    RETURNING t.queue
)
SELECT count(pg_notify('{schema}.tasks', q.queue)) FROM (SELECT DISTINCT queue FROM released) q;

-- name: extend
-- Heartbeat: leases still held move their end to $3 seconds from now.
UPDATE {schema}.tasks t
SET lease_until = now() + $3 * interval '1 second'
FROM unnest($1::text[], $2::text[]) AS r(id, lease_id)
WHERE t.id = r.id AND t.state = 'running' AND (r.lease_id IS NULL OR t.lease_id = r.lease_id)
RETURNING t.id;

-- name: cancel
UPDATE {schema}.tasks SET state = 'cancelled', finished_at = now()
WHERE id = $1 AND state IN ('ready', 'scheduled')
RETURNING id;

-- name: get
SELECT id, payload, state, attempts, extract(epoch FROM due_at)::float8, lease_id, error
FROM {schema}.tasks WHERE id = $1;

-- name: count
-- Pending tasks of one queue, due or not (two partial index scans).
SELECT (SELECT count(*) FROM {schema}.tasks WHERE state = 'ready' AND queue = $1)
     + (SELECT count(*) FROM {schema}.tasks WHERE state = 'scheduled' AND queue = $1);

-- name: list
SELECT id, payload, state, attempts, extract(epoch FROM due_at)::float8, lease_id, error
FROM {schema}.tasks
WHERE state = ANY ($1::text[]) AND ($2::text IS NULL OR queue = $2)
ORDER BY seq
LIMIT $3;

-- name: list_failed
-- The dead letter, on its own partial index.
SELECT id, payload, state, attempts, extract(epoch FROM due_at)::float8, lease_id, error
FROM {schema}.tasks
WHERE state = 'failed' AND ($1::text IS NULL OR queue = $1)
ORDER BY seq
LIMIT $2;

-- name: requeue
-- A failed, cancelled or expired task runs again from scratch.
WITH requeued AS (
    UPDATE {schema}.tasks
    SET state = 'ready', attempts = 0, error = NULL, due_at = to_timestamp($2),
        finished_at = NULL
    WHERE id = $1 AND state IN ('failed', 'cancelled', 'expired')
    RETURNING queue
)
SELECT count(pg_notify('{schema}.tasks', queue)) FROM requeued;

-- name: prune
-- Retention: succeeded, cancelled and expired tasks finished more than $1
-- seconds ago, oldest first, at most $2 per call. Failed ones (the dead
-- letter) stay until re-queued.
DELETE FROM {schema}.tasks
WHERE id = ANY (ARRAY(
    SELECT id FROM {schema}.tasks
    WHERE state IN ('succeeded', 'cancelled', 'expired')
      AND finished_at < now() - $1 * interval '1 second'
    ORDER BY finished_at
    LIMIT $2));

