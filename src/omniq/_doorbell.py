"""Doorbells: wake-ups across processes on one host, through a file.

A writer that makes work available (or stores a result) rings the doorbell of its
store: it writes one byte to a file next to it, after its change is visible.
Waiters in this process are woken directly; waiters in other processes watch the
file with inotify (Linux), so an idle worker sleeps until a producer commits, with no
poll interval. Elsewhere a watcher thread compares the file's modification time
every few milliseconds. Used by the SQLite backend (``<database>-wake``) and the File
backend on local disks (``<base_dir>/.doorbell``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import sys
import threading
from pathlib import Path

from .queue._wakeup import Wakeup

_POLL_SECONDS = 0.005


class Doorbell:
    """One doorbell file as this process sees it; shared through ``acquire``.

    The last ``release`` stops the watcher thread and closes the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid = os.getpid()
        self.users = 0
        self.wakeup = Wakeup()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._watcher: _Watcher | None = None

    def ring(self) -> None:
        """Wake waiters here and in every other process watching the doorbell."""
        self.wakeup.notify()
        fd = self._fd
        if fd is None:
            with self._lock:
                if self._fd is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                    self._fd = os.open(self.path, flags, 0o644)
                fd = self._fd
        os.pwrite(fd, b"\0", 0)

    async def wait(self, timeout: float | None, since: int) -> None:
        """Wait for a ring after wake-up generation ``since`` (or ``timeout``)."""
        if self._watcher is None:
            with self._lock:
                if self._watcher is None:
                    self._watcher = _Watcher(self.path, self.wakeup)
                    # A ring from another process may have come before the watch
                    # existed: make every waiter look once more.
                    self.wakeup.notify()
        await self.wakeup.wait(timeout, since)

    def release(self) -> None:
        with _lock:
            self.users -= 1
            if self.users > 0:
                return
            if _doorbells.get(self.path) is self:
                del _doorbells[self.path]
        with self._lock:
            fd, self._fd = self._fd, None
            watcher, self._watcher = self._watcher, None
        if fd is not None:
            os.close(fd)
        if watcher is not None:
            watcher.stop()


_doorbells: dict[Path, Doorbell] = {}
_lock = threading.Lock()


def acquire(path: Path) -> Doorbell:
    """The process-wide ``Doorbell`` of ``path``; pair with ``release()``.

    A forked child gets its own (threads and descriptors do not cross a fork).
    """
    with _lock:
        found = _doorbells.get(path)
        if found is None or found.pid != os.getpid():
            found = _doorbells[path] = Doorbell(path)
        found.users += 1
        return found


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
