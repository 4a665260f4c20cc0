-- OmniQ task table for SQLite. One row per task, for its whole life.
--
-- state: 'ready' (due now), 'scheduled' (due later: eta or retry backoff),
--        'running' (leased until lease_until under lease_id),
--        'succeeded' | 'failed' | 'cancelled' | 'expired' (final).
-- seq is the rowid: enqueue order, the FIFO tie-break within a priority.
-- Each partial index covers one state, so claims, promotions and lease
-- recovery are index range scans that stay small whatever the history.
CREATE TABLE IF NOT EXISTS omniq_tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    due_at REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_id TEXT,
    lease_until REAL,
    error TEXT,
    finished_at REAL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS omniq_tasks_ready
    ON omniq_tasks (queue, priority DESC, seq) WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS omniq_tasks_scheduled
    ON omniq_tasks (due_at) WHERE state = 'scheduled';
CREATE INDEX IF NOT EXISTS omniq_tasks_running
    ON omniq_tasks (lease_until) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS omniq_tasks_finished
    ON omniq_tasks (state, queue, finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled', 'expired');
