"""One SQLite database file as the process sees it: connections and change notification.

Every queue, result and event storage on the same file shares one
``SQLiteFile``: one connection per thread (opened once, never per call) and
one doorbell (``omniq._doorbell``), ``<database>-wake``, rung after a commit
that makes work available or stores a result. (Watching the ``-wal`` file
instead would wake readers before the commit is visible, and on every write.)
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import _doorbell
from .queue._wakeup import Wakeup

BUSY_TIMEOUT_MS = 30_000

_files: dict[Path, SQLiteFile] = {}
_files_lock = threading.Lock()


def acquire(path: str | os.PathLike[str]) -> SQLiteFile:
    """The process-wide ``SQLiteFile`` for ``path``; pair with ``release()``.

    A forked child gets its own (connections must not cross a fork).
    """
    resolved = Path(path).expanduser().resolve()
    with _files_lock:
        file = _files.get(resolved)
        if file is None or file.pid != os.getpid():
            file = _files[resolved] = SQLiteFile(resolved)
        file.users += 1
        return file


class SQLiteFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid = os.getpid()
        self.users = 0
        self.doorbell = _doorbell.acquire(path.with_name(path.name + "-wake"))
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._schemas: set[str] = set()

    @property
    def wakeup(self) -> Wakeup:
        return self.doorbell.wakeup

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (WAL, busy timeout)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._lock:
                # Close connections of threads that ended (thread-per-request servers).
                alive = [(t, c) for t, c in self._connections if t.is_alive()]
                for _, dead in set(self._connections) - set(alive):
                    dead.close()
                self._connections = [*alive, (threading.current_thread(), conn)]
        return conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # WAL: readers never block the writer; NORMAL: a commit is durable
            # across process crashes, and across power loss up to the last checkpoint.
            _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def ensure_schema(self, name: str, script: str) -> None:
        """Run a ``CREATE ... IF NOT EXISTS`` script once per process."""
        if name in self._schemas:
            return
        with self.transaction() as conn:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
        self._schemas.add(name)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``: the write lock is taken up front, so
        two writers never deadlock upgrading a read lock."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (disk full, I/O error); a failed
            # COMMIT leaves the transaction open. Either way, leave it closed.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def changed(self) -> None:
        """Tell waiters in this and other processes that we committed new work."""
        self.doorbell.ring()

    async def wait(self, timeout: float | None, since: int) -> None:
        """Wait for a change to the file after wake-up generation ``since``."""
        await self.doorbell.wait(timeout, since)

    def release(self) -> None:
        """One user is done; the last one closes the connections and the watcher."""
        with _files_lock:
            self.users -= 1
            if self.users > 0:
                return
            if _files.get(self.path) is self:
                del _files[self.path]
        self._close()

    def _close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._schemas.clear()
        self._local = threading.local()
        for _, conn in connections:
            conn.close()
        self.doorbell.release()


def _retry_locked(statement: Callable[[], object]) -> None:
    """Run ``statement``, retrying "database is locked" until the busy timeout.

    Switching a new file to WAL fails at once when another connection does the
    same: SQLite does not call the busy handler there.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
