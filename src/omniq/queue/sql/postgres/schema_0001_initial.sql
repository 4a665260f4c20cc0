-- OmniQ on PostgreSQL, schema version 1. Every name lives in one schema ({schema},
-- "omniq" by default) so that several applications can share a database.
--
-- tasks: one row per task for its whole life.
--   state: 'ready' (due now), 'scheduled' (due later: eta or retry backoff),
--          'running' (leased to lease_id until lease_until),
--          'succeeded' | 'failed' | 'cancelled' | 'expired' (final).
--   seq is the enqueue order, the FIFO tie-break within a priority.
-- Each partial index covers one state, so a claim, a promotion of due tasks and
-- a recovery of expired leases are index range scans that stay small however
-- much history the table holds. Times are timestamptz on the server's clock.
CREATE TABLE {schema}.tasks (
    id text PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    queue text NOT NULL,
    priority integer NOT NULL,
    state text NOT NULL CHECK (state IN (
        'ready', 'scheduled', 'running', 'succeeded', 'failed', 'cancelled', 'expired')),
    due_at timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    lease_id text,
    lease_until timestamptz,
    error text,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    payload bytea NOT NULL
);
CREATE INDEX tasks_ready ON {schema}.tasks (queue, priority DESC, seq) WHERE state = 'ready';
CREATE INDEX tasks_scheduled ON {schema}.tasks (due_at) WHERE state = 'scheduled';
CREATE INDEX tasks_running ON {schema}.tasks (lease_until) WHERE state = 'running';
CREATE INDEX tasks_failed ON {schema}.tasks (queue, seq) WHERE state = 'failed';
CREATE INDEX tasks_finished ON {schema}.tasks (finished_at)
    WHERE state IN ('succeeded', 'cancelled', 'expired');

-- results: what workers recorded, one row per task, until expires_at (NULL: kept).
CREATE TABLE {schema}.results (
    task_id text PRIMARY KEY,
    payload bytea NOT NULL,
    expires_at timestamptz
);
CREATE INDEX results_expires_at ON {schema}.results (expires_at) WHERE expires_at IS NOT NULL;

-- events: the append-only task lifecycle log. "at" is the event's Unix time in
-- seconds exactly as the core recorded it (float8 keeps it bit for bit).
CREATE TABLE {schema}.events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id text NOT NULL,
    type text NOT NULL,
    at float8 NOT NULL,
    queue_name text,
    func text,
    attempts integer,
    worker text,
    detail text
);
CREATE INDEX events_task_id ON {schema}.events (task_id);
CREATE INDEX events_type_at ON {schema}.events (type, at);
CREATE INDEX events_at ON {schema}.events (at);

-- claim: lease up to max_tasks due tasks for lease_seconds, in delivery order.
--
-- One call is one round trip and does, in order:
-- 1. expired leases (a dead or stalled worker's tasks) become ready again;
-- 2. scheduled tasks whose due time has come become ready;
-- 3. the claim itself, one statement: for each queue in list order (strict
--    priority between queues), the ready tasks by priority then FIFO, locked
--    with FOR UPDATE SKIP LOCKED so that concurrent claimers never wait for
--    nor take each other's rows, then leased by the UPDATE.
-- Steps 1 and 2 are range scans of small partial indexes that find nothing
-- most of the time; they skip rows another claimer is moving, and notify the
-- queues they made work available in, since that work may be for others.
-- Rows chosen by a subquery are updated through "id = ANY (ARRAY(...))": an
-- index lookup per id, where "id IN (subquery)" can plan as a hash join that
-- scans the whole table once the subquery finds anything.
CREATE FUNCTION {schema}.claim(
    queues text[], max_tasks integer, lease_seconds float8, new_lease_id text
) RETURNS TABLE (id text, payload bytea, attempts integer, due_at float8, error text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    notified bigint;
BEGIN
    WITH recovered AS (
        UPDATE {schema}.tasks t SET state = 'ready', lease_id = NULL, lease_until = NULL
        WHERE t.id = ANY (ARRAY(
            SELECT r.id FROM {schema}.tasks r
            WHERE r.state = 'running' AND r.lease_until <= now()
            ORDER BY r.lease_until LIMIT 1000 FOR UPDATE SKIP LOCKED))
        RETURNING t.queue
    ), promoted AS (
        UPDATE {schema}.tasks t SET state = 'ready'
        WHERE t.id = ANY (ARRAY(
            SELECT s.id FROM {schema}.tasks s
            WHERE s.state = 'scheduled' AND s.due_at <= now()
            ORDER BY s.due_at LIMIT 1000 FOR UPDATE SKIP LOCKED))
        RETURNING t.queue
    )
    SELECT count(pg_notify('{schema}.tasks', q.queue)) INTO notified
    FROM (SELECT queue FROM recovered UNION SELECT queue FROM promoted) q;

    -- The lateral subquery reads each queue's ready index in delivery order and
    -- the outer LIMIT stops pulling once max_tasks rows are locked: a later queue
    -- is only read when the earlier ones ran dry, and no row is locked in vain.
    RETURN QUERY
    WITH candidates AS (
        SELECT c.id
        FROM unnest(queues) WITH ORDINALITY AS q(name, pos)
        CROSS JOIN LATERAL (
            SELECT t.id FROM {schema}.tasks t
            WHERE t.state = 'ready' AND t.queue = q.name
            ORDER BY t.priority DESC, t.seq
            LIMIT max_tasks
            FOR UPDATE SKIP LOCKED
        ) c
        LIMIT max_tasks
    ), claimed AS (
        UPDATE {schema}.tasks t
        SET state = 'running', attempts = t.attempts + 1, lease_id = new_lease_id,
            lease_until = now() + lease_seconds * interval '1 second'
        WHERE t.id = ANY (ARRAY(SELECT c.id FROM candidates c))
        RETURNING t.id, t.payload, t.attempts, t.due_at, t.error, t.queue, t.priority, t.seq
    )
    SELECT k.id, k.payload, k.attempts, extract(epoch FROM k.due_at)::float8, k.error
    FROM claimed k
    ORDER BY array_position(queues, k.queue), k.priority DESC, k.seq;
END
$$;
