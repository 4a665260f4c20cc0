-- The event storage's statements (PostgreSQLEventStorage).

-- name: append
-- A batch in one statement, in order: seq follows the input order.
INSERT INTO {schema}.events (task_id, type, at, queue_name, func, attempts, worker, detail)
SELECT e.task_id, e.type, e.at, e.queue_name, e.func, e.attempts, e.worker, e.detail
FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[], $5::text[], $6::integer[],
            $7::text[], $8::text[])
     WITH ORDINALITY AS e(task_id, type, at, queue_name, func, attempts, worker, detail, n)
ORDER BY e.n;

-- name: select
-- Filters (task_id, type, at ranges) and LIMIT are appended by the caller,
-- only those given, so that each query plans on the index it needs.
SELECT task_id, type, at, queue_name, func, attempts, worker, detail FROM {schema}.events

-- name: prune
-- Retention: events older than $1 (Unix seconds), at most $2 per call.
DELETE FROM {schema}.events
WHERE seq = ANY (ARRAY(SELECT seq FROM {schema}.events WHERE at < $1 LIMIT $2));
