"""One SQLite database file as the process sees it: connections and change notification.

Every queue, result and event storage on the same file shares one
``SQLiteFile``: one connection per thread (opened once, never per call) and
one :class:`Wakeup` that fires when the file changes, whoever changed it.
In-process commits notify directly. Commits by other processes are seen
through the operating system: on Linux an inotify watch on the database's
directory reports writes to the ``-wal`` file, so an idle worker sleeps until
a producer writes, with no poll interval. Elsewhere a watcher thread compares
the files' modification times every few milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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
        self.wakeup = Wakeup()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._schemas: set[str] = set()
        self._watcher: _Watcher | None = None

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
        """Tell this process's waiters that we committed something."""
        self.wakeup.notify()

    async def wait(self, timeout: float | None, since: int) -> None:
        """Wait for a change to the file after wake-up generation ``since``."""
        if self._watcher is None:
            with self._lock:
                if self._watcher is None:
                    self._watcher = _Watcher(self.path, self.wakeup)
                    # Another process may have committed after the caller looked and
                    # before the watch existed: make every waiter look once more.
                    self.wakeup.notify()
        await self.wakeup.wait(timeout, since)

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
            watcher, self._watcher = self._watcher, None
        self._local = threading.local()
        for _, conn in connections:
            conn.close()
        if watcher is not None:
            watcher.stop()


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


# inotify constants (linux/inotify.h)
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_CLOEXEC = 0o2000000
_SETTLE_SECONDS = 0.002
_POLL_SECONDS = 0.005


class _Watcher:
    """A daemon thread that notifies ``wakeup`` when the database files change."""

    def __init__(self, path: Path, wakeup: Wakeup) -> None:
        self._path = path
        self._wakeup = wakeup
        self._stop_r, self._stop_w = os.pipe()
        self._inotify = _inotify_watch(path.parent)
        self._files = [path, path.with_name(path.name + "-wal")]
        self._snapshot = [_mtime(f) for f in self._files]  # before the thread: no change missed
        target = self._run_inotify if self._inotify is not None else self._run_polling
        self._thread = threading.Thread(target=target, name=f"omniq-watch-{path.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self._stop_r, self._stop_w, self._inotify):
            if fd is not None:
                os.close(fd)

    def _run_inotify(self) -> None:
        assert self._inotify is not None
        names = {self._path.name.encode(), f"{self._path.name}-wal".encode()}
        poller = select.poll()
        poller.register(self._inotify, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        settling = False
        while True:
            ready = poller.poll(_SETTLE_SECONDS * 1000 if settling else None)
            if any(fd == self._stop_r for fd, _ in ready):
                return
            if not ready:
                # A write event can arrive a moment before the commit is visible
                # in the WAL index; wake waiters once more after it settled.
                settling = False
                self._wakeup.notify()
                continue
            if names & _event_names(os.read(self._inotify, 65536)):
                settling = True
                self._wakeup.notify()

    def _run_polling(self) -> None:
        files, last = self._files, self._snapshot
        while not select.select([self._stop_r], [], [], _POLL_SECONDS)[0]:
            now = [_mtime(f) for f in files]
            if now != last:
                last = now
                self._wakeup.notify()


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


def _inotify_watch(directory: Path) -> int | None:
    """An inotify fd watching ``directory``, or None where inotify is unavailable."""
    if not sys.platform.startswith("linux") or os.environ.get("OMNIQ_SQLITE_POLL"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fd = int(libc.inotify_init1(_IN_CLOEXEC))
    if fd < 0:
        return None
    mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
    if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
        os.close(fd)
        return None
    return fd


def _event_names(buffer: bytes) -> set[bytes]:
    """File names in a buffer of ``struct inotify_event`` records."""
    names: set[bytes] = set()
    offset = 0
    while offset + 16 <= len(buffer):
        name_len = int.from_bytes(buffer[offset + 12 : offset + 16], sys.byteorder)
        names.add(buffer[offset + 16 : offset + 16 + name_len].rstrip(b"\0"))
        offset += 16 + name_len
    return names
