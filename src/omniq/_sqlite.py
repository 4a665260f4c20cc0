"""One SQLite database file as the process sees it: connections and change notification.

Every queue, result and event storage on the same file shares one
``SQLiteFile``: one connection per thread (opened once, never per call) and
one :class:`Wakeup` that fires when the file changes, whoever changed it.
In-process commits notify directly. For other processes, a commit that makes
work available (or stores a result) rings a doorbell: it writes one byte to
``<database>-wake`` after the commit is visible. On Linux an inotify watch
reports that write, so an idle worker sleeps until a producer commits, with
no poll interval; elsewhere a watcher thread compares the doorbell's
modification time every few milliseconds. (Watching the ``-wal`` file
instead would wake readers before the commit is visible.)
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
        self._doorbell_fd: int | None = None

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

    @property
    def doorbell(self) -> Path:
        return self.path.with_name(self.path.name + "-wake")

    def changed(self) -> None:
        """Tell waiters in this and other processes that we committed new work."""
        self.wakeup.notify()
        fd = self._doorbell_fd
        if fd is None:
            with self._lock:
                if self._doorbell_fd is None:
                    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                    self._doorbell_fd = os.open(self.doorbell, flags, 0o644)
                fd = self._doorbell_fd
        os.pwrite(fd, b"\0", 0)

    async def wait(self, timeout: float | None, since: int) -> None:
        """Wait for a change to the file after wake-up generation ``since``."""
        if self._watcher is None:
            with self._lock:
                if self._watcher is None:
                    self._watcher = _Watcher(self.doorbell, self.wakeup)
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
            doorbell, self._doorbell_fd = self._doorbell_fd, None
        if doorbell is not None:
            os.close(doorbell)
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
_IN_MODIFY, _IN_ATTRIB, _IN_DELETE_SELF, _IN_IGNORED = 0x2, 0x4, 0x400, 0x8000
_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_DELETE_SELF
_IN_CLOEXEC = 0o2000000
_POLL_SECONDS = 0.005


class _Watcher:
    """A daemon thread that notifies ``wakeup`` when the doorbell file is written.

    inotify watches the doorbell itself, not the directory: every SQLite write
    to the database files would otherwise wake this thread, and the GIL
    hand-offs that costs show up as milliseconds of latency.
    """

    def __init__(self, doorbell: Path, wakeup: Wakeup) -> None:
        self._doorbell = doorbell
        self._wakeup = wakeup
        self._stop_r, self._stop_w = os.pipe()
        self._inotify = _inotify_init()
        if self._inotify is not None:
            self._watch_doorbell()
        self._snapshot = _mtime(doorbell)  # before the thread starts: no ring is missed
        target = self._run_inotify if self._inotify is not None else self._run_polling
        name = f"omniq-watch-{doorbell.name}"
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def _watch_doorbell(self) -> None:
        assert self._inotify is not None
        self._doorbell.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self._doorbell, os.O_WRONLY | os.O_CREAT, 0o644))
        if _libc().inotify_add_watch(self._inotify, os.fsencode(self._doorbell), _MASK) < 0:
            raise OSError(ctypes.get_errno(), f"cannot watch {self._doorbell}")

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self._stop_r, self._stop_w, self._inotify):
            if fd is not None:
                os.close(fd)

    def _run_inotify(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = poller.poll()
            if any(fd == self._stop_r for fd, _ in ready):
                return
            masks = _event_masks(os.read(self._inotify, 65536))
            if any(mask & _IN_IGNORED for mask in masks):
                self._watch_doorbell()  # the file was deleted: watch the new one
            self._wakeup.notify()

    def _run_polling(self) -> None:
        last = self._snapshot
        while not select.select([self._stop_r], [], [], _POLL_SECONDS)[0]:
            now = _mtime(self._doorbell)
            if now != last:
                last = now
                self._wakeup.notify()


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _inotify_init() -> int | None:
    """An inotify fd, or None where inotify is unavailable (then: polling)."""
    if not sys.platform.startswith("linux") or os.environ.get("OMNIQ_SQLITE_POLL"):
        return None
    try:
        fd = int(_libc().inotify_init1(_IN_CLOEXEC))
    except (OSError, AttributeError):
        return None
    return fd if fd >= 0 else None


def _event_masks(buffer: bytes) -> list[int]:
    """The ``mask`` of each ``struct inotify_event`` in a buffer."""
    masks: list[int] = []
    offset = 0
    while offset + 16 <= len(buffer):
        masks.append(int.from_bytes(buffer[offset + 4 : offset + 8], sys.byteorder))
        name_len = int.from_bytes(buffer[offset + 12 : offset + 16], sys.byteorder)
        offset += 16 + name_len
    return masks
