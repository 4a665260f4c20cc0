"""Event log in a SQLite table, sharing the database file (and its connections) with the queue."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._events import Event, EventType
from .._sqlite import SQLiteFile, acquire
from .._urls import sqlite_path_from_url
from .base import EventStorage, event_from_row

_SCHEMA = """
CREATE TABLE IF NOT EXISTS omniq_events (
    seq INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    type TEXT NOT NULL,
    at REAL NOT NULL,
    queue_name TEXT,
    func TEXT,
    attempts INTEGER,
    worker TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS omniq_events_task_id ON omniq_events (task_id);
CREATE INDEX IF NOT EXISTS omniq_events_type_at ON omniq_events (type, at);
CREATE INDEX IF NOT EXISTS omniq_events_at ON omniq_events (at)
"""
_INSERT = (
    "INSERT INTO omniq_events (task_id, type, at, queue_name, func, attempts, worker, detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = "SELECT task_id, type, at, queue_name, func, attempts, worker, detail FROM omniq_events"

#: Pruning is a range delete on the ``at`` index; once a minute keeps it off the append path.
PRUNE_INTERVAL_SECONDS = 60.0

_Row = tuple[str, str, float, str | None, str | None, int | None, str | None, str | None]


class SQLiteEventStorage(EventStorage):
    """Events in the ``omniq_events`` table, in append order (``seq``).

    The database file is opened on first use through the process-wide
    ``SQLiteFile``, so the queue, results and events on one file share one
    connection per thread. Appends and queries run in a worker thread: a
    write may wait on another process's write lock (up to the busy timeout),
    which must not stall the event loop. Appends do not wake the queue's
    waiters in this process: an event is not work.

    ``retention_seconds`` (None: keep everything) deletes events older than
    that, checked at most once a minute during ``append``.
    """

    schemes = ("sqlite",)

    def __init__(
        self,
        database_path: str | os.PathLike[str] = "omniq.db",
        *,
        retention_seconds: float | None = None,
    ) -> None:
        if retention_seconds is not None and retention_seconds <= 0:
            raise ValueError(f"retention_seconds must be positive or None, not {retention_seconds}")
        self.database_path = Path(database_path)
        self.retention_seconds = retention_seconds
        self._lock = threading.Lock()
        self._file: SQLiteFile | None = None
        self._next_prune = 0.0  # time.monotonic() of the next prune

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteEventStorage:
        """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db``."""
        return cls(sqlite_path_from_url(url), **options)

    async def append(self, events: Sequence[Event]) -> None:
        if not events:
            return
        rows = [
            (
                e.task_id,
                EventType(e.type).value,
                e.at,
                e.queue_name,
                e.func,
                e.attempts,
                e.worker,
                e.detail,
            )
            for e in events
        ]
        await asyncio.to_thread(self._append, self._acquired(), rows)

    async def query(
        self,
        *,
        task_id: str | None = None,
        type: EventType | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        clauses: list[str] = []
        params: list[Any] = []
        if task_id is not None:
            clauses.append("task_id = ?")
            params.append(task_id)
        if type is not None:
            clauses.append("type = ?")
            params.append(EventType(type).value)
        if since is not None:
            clauses.append("at >= ?")
            params.append(since)
        if until is not None:
            clauses.append("at < ?")
            params.append(until)
        sql = _SELECT
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(limit, 0))
        rows = await asyncio.to_thread(self._select, self._acquired(), sql, params)
        return [event_from_row(row) for row in rows]

    async def close(self) -> None:
        with self._lock:
            file, self._file = self._file, None
        if file is not None and file.pid == os.getpid():
            file.release()

    def _acquired(self) -> SQLiteFile:
        """The shared file, acquired on first use (and again in a forked child)."""
        with self._lock:
            if self._file is None or self._file.pid != os.getpid():
                self._file = acquire(self.database_path)
            return self._file

    def _append(self, file: SQLiteFile, rows: list[tuple[Any, ...]]) -> None:
        file.ensure_schema("omniq_events", _SCHEMA)
        cutoff = None
        if self.retention_seconds is not None and time.monotonic() >= self._next_prune:
            cutoff = time.time() - self.retention_seconds
        with file.transaction() as conn:
            conn.executemany(_INSERT, rows)
            if cutoff is not None:
                conn.execute("DELETE FROM omniq_events WHERE at < ?", (cutoff,))
        if cutoff is not None:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS

    def _select(self, file: SQLiteFile, sql: str, params: list[Any]) -> list[_Row]:
        file.ensure_schema("omniq_events", _SCHEMA)
        rows: list[_Row] = file.connection().execute(sql, params).fetchall()
        return rows
