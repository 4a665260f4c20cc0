"""SQLite queue: WAL, one write transaction per claim batch, OS-level wake-ups across processes.

Operations run inline on the caller's thread or event loop: each is one short
transaction on a local file (tens of microseconds), cheaper than handing it to
another thread. Several processes share one file safely: every state change
is a ``BEGIN IMMEDIATE`` transaction, and a claim flips rows to ``running``
inside it, so a task is leased to exactly one consumer.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from .. import _sqlite
from .._task import TaskStatus
from .._urls import sqlite_path_from_url
from ..results.base import ResultStorage
from .base import LeaseRef, NewRow, StoredRow, TaskQueue

_SCHEMA = resources.files(__package__).joinpath("sql/sqlite_schema.sql").read_text()
_PUBLIC_STATE = {"ready": TaskStatus.PENDING, "scheduled": TaskStatus.PENDING}
_FINAL_STATE = {
    TaskStatus.SUCCEEDED: "succeeded",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "cancelled",
    TaskStatus.EXPIRED: "expired",
}
_ROW_COLUMNS = "id, payload, state, attempts, due_at, lease_id, error"
_PRUNE_EVERY = 60.0
_INSERT = (
    "INSERT OR IGNORE INTO omniq_tasks (id, queue, priority, due_at, state, payload)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def _row(values: Sequence[Any]) -> StoredRow:
    task_id, payload, state, attempts, due_at, lease_id, error = values
    status = _PUBLIC_STATE.get(state) or TaskStatus(state)
    return StoredRow(task_id, payload, status, attempts, due_at, lease_id, error)


def _update_leased(
    conn: sqlite3.Connection, refs: Sequence[LeaseRef], change: str, params: Sequence[Any]
) -> list[bool]:
    """Apply ``change`` to the tasks still leased under ``refs``, in one statement.

    A ref whose ``lease_id`` is None matches any lease. True where the row changed.
    """
    values = ", ".join(["(?, ?)"] * len(refs))
    sql = (
        f"WITH refs(id, lease_id) AS (VALUES {values})"
        f" UPDATE omniq_tasks SET {change}"
        " WHERE state = 'running' AND id IN (SELECT id FROM refs) AND EXISTS ("
        "  SELECT 1 FROM refs WHERE refs.id = omniq_tasks.id"
        "  AND (refs.lease_id IS NULL OR refs.lease_id = omniq_tasks.lease_id))"
        " RETURNING id"
    )
    bound: list[Any] = [value for ref in refs for value in ref]
    changed = {row[0] for row in conn.execute(sql, [*bound, *params])}
    return [ref.id in changed for ref in refs]


class SQLiteTaskQueue(TaskQueue):
    """Tasks in a SQLite file, shared by every process on the host that opens it.

    ``retention_seconds``: how long succeeded, cancelled and expired tasks stay
    visible to ``get_task`` before they are pruned; failed tasks (the dead
    letter) stay until re-queued.
    """

    schemes = ("sqlite",)
    supports_blocking_put = True

    def __init__(
        self,
        database_path: str | os.PathLike[str] = "omniq.db",
        *,
        retention_seconds: float = 3600.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        # Absolute now: a later chdir must not split tasks and results across files.
        self.database_path = os.path.abspath(os.path.expanduser(os.fspath(database_path)))
        self.retention_seconds = retention_seconds
        self._file: _sqlite.SQLiteFile | None = None
        self._next_prune = 0.0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteTaskQueue:
        return cls(sqlite_path_from_url(url), **options)

    def default_result_storage(self) -> ResultStorage:
        from ..results.sqlite import SQLiteResultStorage

        return SQLiteResultStorage(self.database_path)

    def _db(self) -> _sqlite.SQLiteFile:
        file = self._file
        if file is None:
            file = self._file = _sqlite.acquire(self.database_path)
        file.ensure_schema("tasks", _SCHEMA)
        return file

    # -- primitives -------------------------------------------------------------
    async def _put(self, rows: Sequence[NewRow]) -> list[bool]:
        return self._put_blocking(rows)

    def _put_blocking(self, rows: Sequence[NewRow]) -> list[bool]:
        db = self._db()
        now = time.time()
        params = [
            (*row[:4], "ready" if row.due_at <= now else "scheduled", row.payload) for row in rows
        ]
        if len(params) == 1:  # one statement is its own transaction: skip BEGIN/COMMIT
            inserted = [db.connection().execute(_INSERT, params[0]).rowcount == 1]
        else:
            with db.transaction() as conn:
                inserted = [conn.execute(_INSERT, p).rowcount == 1 for p in params]
        db.changed()
        return inserted

    async def _claim(
        self, queues: Sequence[str], limit: int, now: float, lease_until: float, lease_id: str
    ) -> list[StoredRow]:
        db = self._db()
        claim = (
            "UPDATE omniq_tasks SET state = 'running', attempts = attempts + 1,"
            " lease_id = ?, lease_until = ?"
            " WHERE seq IN (SELECT seq FROM omniq_tasks WHERE state = 'ready' AND queue = ?"
            "  ORDER BY priority DESC, seq LIMIT ?)"
            f" RETURNING priority, seq, {_ROW_COLUMNS}"
        )
        claimed: list[StoredRow] = []
        with db.transaction() as conn:
            self._recover_and_promote(conn, now)
            for name in queues:
                rows = conn.execute(
                    claim, (lease_id, lease_until, name, limit - len(claimed))
                ).fetchall()
                # RETURNING gives no order guarantee: restore delivery order.
                rows.sort(key=lambda r: (-r[0], r[1]))
                claimed += [_row(r[2:]) for r in rows]
                if len(claimed) >= limit:
                    break
        return claimed

    def _recover_and_promote(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute(
            "UPDATE omniq_tasks SET state = 'ready' WHERE state = 'scheduled' AND due_at <= ?",
            (now,),
        )
        conn.execute(
            "UPDATE omniq_tasks SET state = 'ready', lease_id = NULL"
            " WHERE state = 'running' AND lease_until <= ?",
            (now,),
        )
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY
            conn.execute(
                "DELETE FROM omniq_tasks WHERE state IN ('succeeded', 'cancelled', 'expired')"
                " AND finished_at < ?",
                (now - self.retention_seconds,),
            )

    def _wake_generation(self) -> int:
        return self._db().wakeup.generation

    async def _wait(self, queues: Sequence[str], timeout: float, since: int) -> None:
        db = self._db()
        next_due = (
            db.connection()
            .execute(
                "SELECT min(t) FROM ("
                " SELECT min(due_at) AS t FROM omniq_tasks WHERE state = 'scheduled'"
                " UNION ALL SELECT min(lease_until) FROM omniq_tasks WHERE state = 'running')"
            )
            .fetchone()[0]
        )
        if next_due is not None:
            timeout = min(timeout, max(0.0, next_due - time.time()))
        await db.wait(timeout, since)

    async def _finish(
        self, refs: Sequence[LeaseRef], status: TaskStatus, error: str | None
    ) -> list[bool]:
        change = "state = ?, error = ?, lease_id = NULL, finished_at = ?"
        with self._db().transaction() as conn:
            return _update_leased(conn, refs, change, (_FINAL_STATE[status], error, time.time()))

    async def _retry(self, ref: LeaseRef, due_at: float, error: str | None) -> bool:
        db = self._db()
        state = "ready" if due_at <= time.time() else "scheduled"
        change = "state = ?, due_at = ?, error = ?, lease_id = NULL"
        with db.transaction() as conn:
            [done] = _update_leased(conn, [ref], change, (state, due_at, error))
        db.changed()
        return done

    async def _release(self, refs: Sequence[LeaseRef]) -> None:
        db = self._db()
        change = "state = 'ready', attempts = attempts - 1, lease_id = NULL"
        with db.transaction() as conn:
            _update_leased(conn, refs, change, ())
        db.changed()

    async def _extend(self, refs: Sequence[LeaseRef], lease_until: float) -> list[bool]:
        with self._db().transaction() as conn:
            return _update_leased(conn, refs, "lease_until = ?", (lease_until,))

    async def _cancel(self, task_id: str) -> bool:
        with self._db().transaction() as conn:
            cursor = conn.execute(
                "UPDATE omniq_tasks SET state = 'cancelled', finished_at = ?"
                " WHERE id = ? AND state IN ('ready', 'scheduled')",
                (time.time(), task_id),
            )
            return cursor.rowcount == 1

    async def _get(self, task_id: str) -> StoredRow | None:
        found = (
            self._db()
            .connection()
            .execute(f"SELECT {_ROW_COLUMNS} FROM omniq_tasks WHERE id = ?", (task_id,))
            .fetchone()
        )
        return None if found is None else _row(found)

    async def _count(self, queue: str) -> int:
        conn = self._db().connection()
        return int(
            conn.execute(
                "SELECT (SELECT count(*) FROM omniq_tasks WHERE state = 'ready' AND queue = ?)"
                " + (SELECT count(*) FROM omniq_tasks WHERE state = 'scheduled' AND queue = ?)",
                (queue, queue),
            ).fetchone()[0]
        )

    async def _list(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        state = _FINAL_STATE.get(status)
        states = (
            (state,)
            if state
            else (("running",) if status is TaskStatus.RUNNING else ("ready", "scheduled"))
        )
        marks = ", ".join("?" * len(states))
        rows = (
            self._db()
            .connection()
            .execute(
                f"SELECT {_ROW_COLUMNS} FROM omniq_tasks WHERE state IN ({marks})"
                " AND (? IS NULL OR queue = ?) ORDER BY seq LIMIT ?",
                (*states, queue, queue, limit),
            )
            .fetchall()
        )
        return [_row(r) for r in rows]

    async def _requeue(self, task_id: str, now: float) -> bool:
        db = self._db()
        with db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE omniq_tasks SET state = 'ready', attempts = 0, error = NULL, due_at = ?,"
                " finished_at = NULL WHERE id = ? AND state IN ('failed', 'cancelled', 'expired')",
                (now, task_id),
            )
        db.changed()
        return cursor.rowcount == 1

    async def _close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.release()
