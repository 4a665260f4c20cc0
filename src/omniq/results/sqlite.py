"""Result storage in a SQLite file, shared by every process that opens the same file."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from .._sqlite import SQLiteFile, acquire
from .._urls import sqlite_path_from_url
from .base import ResultStorage, TaskResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS omniq_results (
    task_id TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS omniq_results_expires_at ON omniq_results (expires_at)
"""

_UPSERT = "INSERT OR REPLACE INTO omniq_results (task_id, payload, expires_at) VALUES (?, ?, ?)"
_SELECT = (
    "SELECT payload FROM omniq_results WHERE task_id = ? AND (expires_at IS NULL OR expires_at > ?)"
)
_PRUNE = "DELETE FROM omniq_results WHERE expires_at <= ?"
_DELETE = "DELETE FROM omniq_results WHERE task_id = ?"

#: Expired rows are invisible to ``get`` anyway; deleting them is only about
#: file size, so it is done at most this often (seconds) per instance.
_PRUNE_INTERVAL = 60.0

_decoder = msgspec.msgpack.Decoder(TaskResult)


class SQLiteResultStorage(ResultStorage):
    """Results as msgpack blobs in ``omniq_results``, keyed by task id.

    Expiry uses wall-clock time because several processes compare it. The
    file is opened lazily on first use and shared with every other omniq
    storage on it in this process; ``close`` gives it back, and a later call
    opens it again. ``wait`` sleeps until the file changes (a commit by this
    or any other process) instead of polling at an interval.
    """

    schemes = ("sqlite",)

    def __init__(self, database_path: str | os.PathLike[str] = "omniq.db") -> None:
        # Anchored now (no I/O) so a later chdir cannot point a reopen elsewhere.
        self.database_path = Path(database_path).expanduser().absolute()
        self._lock = threading.Lock()
        self._file: SQLiteFile | None = None
        self._next_prune = 0.0  # monotonic

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteResultStorage:
        """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db``."""
        return cls(sqlite_path_from_url(url), **options)

    def _sqlite(self) -> SQLiteFile:
        """The shared file, acquired (and the table created) on first use."""
        with self._lock:
            if self._file is None:
                file = acquire(self.database_path)
                try:
                    file.ensure_schema("omniq_results", _SCHEMA)
                except BaseException:
                    file.release()
                    raise
                self._file = file
            return self._file

    async def set_many(self, results: Sequence[tuple[TaskResult, float | None]]) -> None:
        if not results:
            return
        now = time.time()
        rows = [
            (result.task_id, msgspec.msgpack.encode(result), None if ttl is None else now + ttl)
            for result, ttl in results
        ]
        file = self._sqlite()
        with file.transaction() as conn:
            conn.executemany(_UPSERT, rows)
            if time.monotonic() >= self._next_prune:
                conn.execute(_PRUNE, (now,))
                self._next_prune = time.monotonic() + _PRUNE_INTERVAL
        file.changed()

    async def get(self, task_id: str) -> TaskResult | None:
        conn = self._sqlite().connection()
        row = conn.execute(_SELECT, (task_id, time.time())).fetchone()
        return None if row is None else _decoder.decode(row[0])

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        """Look, then sleep until the file changes and look again, until found or timed out."""
        file = self._sqlite()
        result = await self.get(task_id)
        if result is not None:
            return result
        # SQLiteFile starts its change watcher inside its first wait(), so a
        # commit by another process between a look and that first wait would
        # go unseen. Start the watcher now (a zero wait) and look again below,
        # after it is running.
        await file.wait(0.0, file.wakeup.generation)
        return await self._wait_notified(
            task_id, timeout, lambda: file.wakeup.generation, file.wait
        )

    async def delete(self, task_id: str) -> None:
        self._sqlite().connection().execute(_DELETE, (task_id,))

    async def close(self) -> None:
        with self._lock:
            file, self._file = self._file, None
        if file is not None:
            file.release()
