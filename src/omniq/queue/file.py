"""File queue over fsspec: local and shared disks by atomic rename, object stores by
create-if-absent.

On a local (or shared, POSIX) disk a task is one file, linked under two names: its
record ``ids/<id>`` (a header line, then the payload) and one *state name* that moves
with ``rename(2)`` between the state directories. Only one of several renamers of a
name succeeds, so each state change (claim, ack, recovery, cancel, …) happens once::

    ids/<id>                                        record: "<queue> <priority> <seq>\\n" + payload
    q/<queue>/ready/<prio>.<seq>.<id>.<attempts>.<due>              due now: a sorted
    q/<queue>/sched/<due>.<prio>.<seq>.<id>.<attempts>              listing is the order
    q/<queue>/leased/<until>.<lease>.<prio>.<seq>.<id>.<attempts>.<due>
    done/<status>/<queue>/<finished>.<prio>.<seq>.<id>.<attempts>.<due>
    errors/<id>                                     the last error, when there is one
    .doorbell                                       rung after every change that adds work

Every key is fixed-width hex (``<prio>`` inverted), so names sort in delivery order.
Object stores have no rename; they use ``omniq._fs.ObjectQueue``. The full protocol,
and what each filesystem guarantees, is in ``docs/backends/file.md``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _doorbell, _fs
from .._fs import dec, enc, enc_id, key_time, next_seq, prio_key, time_key
from .._task import TaskStatus
from .base import LeaseRef, NewRow, StoredRow, TaskQueue

if TYPE_CHECKING:
    from ..results.file import FileResultStorage

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_FINAL = ("succeeded", "failed", "cancelled", "expired")
#: A listing of a directory that other processes write is taken again after this long
#: even without a doorbell (writers on other hosts of a shared disk ring no inotify).
RELIST_SECONDS = 1.0
#: An id record that no state name links to, this old, belongs to an enqueue that died
#: between its two steps; a new enqueue with that id replaces it.
ORPHAN_SECONDS = 60.0
PRUNE_SECONDS = 60.0


@dataclass
class _QueueCache:
    """What this process last listed in one queue's directories."""

    ready: list[str] = field(default_factory=list)  # sorted descending: pop() is next
    ready_gen: int = -1
    ready_at: float = float("-inf")
    sched_next: float = float("-inf")
    sched_gen: int = -1
    sched_at: float = float("-inf")
    leased_next: float = float("-inf")
    leased_at: float = float("-inf")


class _Shared:
    """Per process and base directory: listings and the directories known to exist."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: dict[str, _QueueCache] = {}
        self.made: set[str] = set()


_shared: dict[tuple[str, int], _Shared] = {}
_shared_lock = threading.Lock()


def _shared_state(base: str) -> _Shared:
    with _shared_lock:
        return _shared.setdefault((base, os.getpid()), _Shared())


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class LocalQueue:
    """The rename protocol on a local or shared POSIX directory. Calls are synchronous:
    each is a few system calls on a local file, cheaper inline than in a thread."""

    def __init__(
        self, base: str, *, fsync: bool, retention_seconds: float, max_poll_seconds: float
    ) -> None:
        self.base = base
        self.fsync = fsync
        self.retention_seconds = retention_seconds
        self.max_poll_seconds = max_poll_seconds
        self.ids = os.path.join(base, "ids")
        self.errors = os.path.join(base, "errors")
        self.bell = _doorbell.acquire(Path(base) / ".doorbell")
        self._shared = _shared_state(base)
        self._held: dict[str, tuple[str, str]] = {}  # id → (leased dir, name)
        self._qdirs: dict[tuple[str, str], str] = {}
        self._next_prune = 0.0
        self._ensure(self.ids, self.errors, os.path.join(base, "tmp"))

    # -- directories -----------------------------------------------------------------
    def _ensure(self, *paths: str) -> None:
        made = self._shared.made
        for path in paths:
            if path not in made:
                os.makedirs(path, exist_ok=True)
                made.add(path)

    def _qdir(self, queue: str, kind: str) -> str:
        path = self._qdirs.get((queue, kind))
        if path is None:
            path = os.path.join(self.base, "q", enc(queue), kind)
            self._ensure(path)
            self._qdirs[(queue, kind)] = path
        return path

    def _done_dir(self, status: str, qenc: str) -> str:
        path = os.path.join(self.base, "done", status, qenc)
        self._ensure(path)
        return path

    def _cache(self, queue: str) -> _QueueCache:
        with self._shared.lock:
            return self._shared.queues.setdefault(queue, _QueueCache())

    def _sync_dirs(self, paths: set[str]) -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- enqueue -------------------------------------------------------------------------
    def put(self, rows: Sequence[NewRow]) -> list[bool]:
        now = time.time()
        inserted: list[bool] = []
        touched: set[str] = set()
        for row in rows:
            idenc, prio = enc_id(row.id), prio_key(row.priority)
            seq = next_seq()
            record = f"{self.ids}/{idenc}"
            header = f"{enc(row.queue)} {row.priority} {seq:016x}\n".encode()
            if not self._create(record, header + row.payload) and not (
                self._drop_orphan(record) and self._create(record, header + row.payload)
            ):
                inserted.append(False)
                continue
            due = time_key(row.due_at)
            if row.due_at <= now:
                directory, name = (
                    self._qdir(row.queue, "ready"),
                    f"{prio}.{seq:016x}.{idenc}.0.{due}",
                )
            else:
                directory, name = (
                    self._qdir(row.queue, "sched"),
                    f"{due}.{prio}.{seq:016x}.{idenc}.0",
                )
            os.link(record, f"{directory}/{name}")
            touched.add(directory)
            inserted.append(True)
        if self.fsync and touched:
            self._sync_dirs({*touched, self.ids})
        if touched:
            self.bell.ring()
        return inserted

    def _create(self, path: str, data: bytes) -> bool:
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o644)
        except FileExistsError:
            return False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _drop_orphan(self, record: str) -> bool:
        """Remove ``record`` if its enqueue died before linking a state name to it."""
        try:
            stat = os.stat(record)
        except FileNotFoundError:
            return True
        if stat.st_nlink != 1 or time.time() - stat.st_mtime < ORPHAN_SECONDS:
            return False
        aside = os.path.join(self.base, "tmp", f"orphan-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(record, aside)  # one of several repairers wins
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return True

    # -- claim -----------------------------------------------------------------------------
    def claim(
        self, queues: Sequence[str], limit: int, now: float, until: float, lease_id: str
    ) -> list[StoredRow]:
        generation = self.bell.wakeup.generation
        self._prune(now)
        claimed: list[StoredRow] = []
        for queue in queues:
            ready, cache = self._qdir(queue, "ready"), self._cache(queue)
            if self._recover(queue, cache, now) | self._promote(queue, cache, now, generation):
                cache.ready_at = float("-inf")
            while len(claimed) < limit:
                name = self._next_ready(ready, cache, generation, now)
                if name is None:
                    break
                row = self._take(queue, cache, name, until, lease_id)
                if row is not None:
                    claimed.append(row)
            if len(claimed) >= limit:
                break
        return claimed

    def _next_ready(
        self, ready: str, cache: _QueueCache, generation: int, now: float
    ) -> str | None:
        with self._shared.lock:
            stale = cache.ready_gen != generation or now - cache.ready_at > RELIST_SECONDS
            if stale or not cache.ready:
                cache.ready = sorted(_listdir(ready), reverse=True)
                cache.ready_gen, cache.ready_at = generation, now
            return cache.ready.pop() if cache.ready else None

    def _take(
        self, queue: str, cache: _QueueCache, name: str, until: float, lease_id: str
    ) -> StoredRow | None:
        parts = name.split(".")
        if len(parts) != 5:
            return None
        prio, seq, idenc, attempts, due = parts
        leased_dir = self._qdir(queue, "leased")
        leased = f"{time_key(until)}.{lease_id}.{prio}.{seq}.{idenc}.{int(attempts) + 1}.{due}"
        try:
            os.rename(
                os.path.join(self._qdir(queue, "ready"), name), os.path.join(leased_dir, leased)
            )
            data = _read(os.path.join(leased_dir, leased))
        except FileNotFoundError:
            return None  # another worker took it first
        cache.leased_next = min(cache.leased_next, until)
        task_id = dec(idenc)
        self._held[task_id] = (leased_dir, leased)
        payload = data.partition(b"\n")[2] if b"\n" in data else data
        error = self._error(idenc) if int(attempts) > 0 else None
        return StoredRow(
            task_id, payload, TaskStatus.RUNNING, int(attempts) + 1, key_time(due), lease_id, error
        )

    def _recover(self, queue: str, cache: _QueueCache, now: float) -> bool:
        """Leases that ended go back to ready (attempts stay raised); True if any did."""
        if cache.leased_next > now and now - cache.leased_at < RELIST_SECONDS:
            return False
        leased, ready = self._qdir(queue, "leased"), self._qdir(queue, "ready")
        cache.leased_at, cache.leased_next = now, float("inf")
        moved = False
        for name in sorted(_listdir(leased)):
            parts = name.split(".")
            if len(parts) != 7:
                continue
            if key_time(parts[0]) > now:
                cache.leased_next = key_time(parts[0])
                break
            target = os.path.join(ready, ".".join(parts[2:]))
            with contextlib.suppress(FileNotFoundError):
                os.rename(os.path.join(leased, name), target)
                moved = True
        return moved

    def _promote(self, queue: str, cache: _QueueCache, now: float, generation: int) -> bool:
        """Scheduled tasks whose time came become ready; True if any did."""
        fresh = cache.sched_gen == generation and now - cache.sched_at < RELIST_SECONDS
        if fresh and cache.sched_next > now:
            return False
        sched, ready = self._qdir(queue, "sched"), self._qdir(queue, "ready")
        cache.sched_gen, cache.sched_at, cache.sched_next = generation, now, float("inf")
        moved = False
        for name in sorted(_listdir(sched)):
            parts = name.split(".")
            if len(parts) != 5:
                continue
            if key_time(parts[0]) > now:
                cache.sched_next = key_time(parts[0])
                break
            target = os.path.join(ready, ".".join([*parts[1:], parts[0]]))
            with contextlib.suppress(FileNotFoundError):
                os.rename(os.path.join(sched, name), target)
                moved = True
        return moved

    # -- waiting ---------------------------------------------------------------------------
    async def wait(self, queues: Sequence[str], timeout: float, since: int) -> None:
        """Sleep until the doorbell rings, the next due time or lease end, or the relist."""
        now = time.time()
        for queue in queues:
            cache = self._cache(queue)
            for when in (cache.sched_next, cache.leased_next):
                timeout = min(timeout, max(0.0, when - now))
        await self.bell.wait(min(timeout, self.max_poll_seconds), since)

    # -- leased tasks ------------------------------------------------------------------------
    def _find_leased(self, ref: LeaseRef) -> Iterator[tuple[str, str, list[str]]]:
        """Candidates for the task ``ref`` leases: the remembered name, then a fresh look."""
        held = self._held.get(ref.id)
        if held is not None:
            parts = held[1].split(".")
            if ref.lease_id is None or parts[1] == ref.lease_id:
                yield held[0], held[1], parts
        queue = self._queue_of(enc(ref.id))
        if queue is None:
            return
        leased, idenc = self._qdir(queue, "leased"), enc(ref.id)
        for name in _listdir(leased):
            parts = name.split(".")
            mine = ref.lease_id is None or parts[1:2] == [ref.lease_id]
            if len(parts) == 7 and parts[4] == idenc and mine:
                yield leased, name, parts

    def _on_leased(self, ref: LeaseRef, move: Callable[[str, list[str]], str]) -> bool:
        """Rename the task ``ref`` leases to ``move(leased dir, parts)``; False if lost."""
        for directory, name, parts in self._find_leased(ref):
            target = move(directory, parts)
            try:
                os.rename(os.path.join(directory, name), target)
            except FileNotFoundError:
                continue
            if os.path.dirname(target) == directory:
                self._held[ref.id] = (directory, os.path.basename(target))
            else:
                self._held.pop(ref.id, None)
            return True
        self._held.pop(ref.id, None)
        return False

    def finish(self, refs: Sequence[LeaseRef], status: TaskStatus, error: str | None) -> list[bool]:
        now = time_key(time.time())

        def move(directory: str, parts: list[str]) -> str:
            _, _, prio, seq, idenc, attempts, due = parts
            self._set_error(idenc, error, int(attempts))
            done = self._done_dir(status.value, os.path.basename(os.path.dirname(directory)))
            return os.path.join(done, f"{now}.{prio}.{seq}.{idenc}.{attempts}.{due}")

        return [self._on_leased(ref, move) for ref in refs]

    def retry(self, ref: LeaseRef, due_at: float, error: str | None) -> bool:
        due = time_key(due_at)

        def move(directory: str, parts: list[str]) -> str:
            _, _, prio, seq, idenc, attempts, _ = parts
            self._set_error(idenc, error, int(attempts))
            queue_dir = os.path.dirname(directory)
            if due_at <= time.time():
                return os.path.join(queue_dir, "ready", f"{prio}.{seq}.{idenc}.{attempts}.{due}")
            return os.path.join(queue_dir, "sched", f"{due}.{prio}.{seq}.{idenc}.{attempts}")

        done = self._on_leased(ref, move)
        if done:
            self.bell.ring()
        return done

    def release(self, refs: Sequence[LeaseRef]) -> None:
        def move(directory: str, parts: list[str]) -> str:
            _, _, prio, seq, idenc, attempts, due = parts
            name = f"{prio}.{seq}.{idenc}.{int(attempts) - 1}.{due}"
            return os.path.join(os.path.dirname(directory), "ready", name)

        if any([self._on_leased(ref, move) for ref in refs]):
            self.bell.ring()

    def extend(self, refs: Sequence[LeaseRef], lease_until: float) -> list[bool]:
        until = time_key(lease_until)

        def move(directory: str, parts: list[str]) -> str:
            return os.path.join(directory, ".".join([until, *parts[1:]]))

        return [self._on_leased(ref, move) for ref in refs]

    def _error(self, idenc: str) -> str | None:
        try:
            return _read(os.path.join(self.errors, idenc)).decode()
        except FileNotFoundError:
            return None

    def _set_error(self, idenc: str, error: str | None, attempts: int) -> None:
        path = os.path.join(self.errors, idenc)
        if error is not None:
            with open(path, "w", encoding="utf-8") as file:
                file.write(error)
        elif attempts > 1:  # only a task delivered more than once can have one
            _unlink(path)

    # -- by id -----------------------------------------------------------------------------
    def _header(self, idenc: str) -> tuple[str, bytes] | None:
        """(queue, payload) of a task's record, or None if the id is unknown."""
        try:
            data = _read(os.path.join(self.ids, idenc))
        except FileNotFoundError:
            return None
        header, _, payload = data.partition(b"\n")
        return dec(header.split(b" ", 1)[0].decode()), payload

    def _queue_of(self, idenc: str) -> str | None:
        found = self._header(idenc)
        return None if found is None else found[0]

    def _locate(self, queue: str, idenc: str) -> Iterator[tuple[str, str, TaskStatus, list[str]]]:
        """Where the task's state name is: (dir, name, status, [attempts, due, lease])."""
        for kind, status in (("ready", TaskStatus.PENDING), ("sched", TaskStatus.PENDING)):
            directory = self._qdir(queue, kind)
            for name in _listdir(directory):
                parts = name.split(".")
                if len(parts) == 5 and parts[2 if kind == "ready" else 3] == idenc:
                    due = parts[4] if kind == "ready" else parts[0]
                    attempts = parts[3] if kind == "ready" else parts[4]
                    yield directory, name, status, [attempts, due, ""]
        leased = self._qdir(queue, "leased")
        for name in _listdir(leased):
            parts = name.split(".")
            if len(parts) == 7 and parts[4] == idenc:
                yield leased, name, TaskStatus.RUNNING, [parts[5], parts[6], parts[1]]
        for status_name in _FINAL:
            directory = self._done_dir(status_name, enc(queue))
            for name in _listdir(directory):
                parts = name.split(".")
                if len(parts) == 6 and parts[3] == idenc:
                    yield directory, name, TaskStatus(status_name), [parts[4], parts[5], ""]

    def get(self, task_id: str) -> StoredRow | None:
        idenc = enc(task_id)
        for _ in range(3):  # a task may move while we look
            found = self._header(idenc)
            if found is None:
                return None
            queue, payload = found
            for _dir, _name, status, (attempts, due, lease) in self._locate(queue, idenc):
                error = self._error(idenc)
                row = StoredRow(task_id, payload, status, int(attempts), key_time(due), None, error)
                return row._replace(lease_id=lease or None)
        return None

    def cancel(self, task_id: str) -> bool:
        idenc = enc(task_id)
        queue = self._queue_of(idenc)
        if queue is None:
            return False
        done = self._done_dir("cancelled", enc(queue))
        now = time_key(time.time())
        for directory, name, status, (attempts, due, _) in self._locate(queue, idenc):
            if status is not TaskStatus.PENDING:
                return False
            parts = name.split(".")
            prio, seq = (
                (parts[0], parts[1]) if directory.endswith("ready") else (parts[1], parts[2])
            )
            target = os.path.join(done, f"{now}.{prio}.{seq}.{idenc}.{attempts}.{due}")
            try:
                os.rename(os.path.join(directory, name), target)
            except FileNotFoundError:
                return False  # claimed meanwhile
            return True
        return False

    def requeue(self, task_id: str, now: float) -> bool:
        idenc = enc(task_id)
        queue = self._queue_of(idenc)
        if queue is None:
            return False
        for directory, name, status, _ in self._locate(queue, idenc):
            if status not in (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.EXPIRED):
                return False
            _, prio, seq, _, _, _ = name.split(".")
            target = os.path.join(
                self._qdir(queue, "ready"), f"{prio}.{seq}.{idenc}.0.{time_key(now)}"
            )
            _unlink(os.path.join(self.errors, idenc))
            try:
                os.rename(os.path.join(directory, name), target)
            except FileNotFoundError:
                return False
            self.bell.ring()
            return True
        return False

    def count(self, queue: str) -> int:
        return len(_listdir(self._qdir(queue, "ready"))) + len(_listdir(self._qdir(queue, "sched")))

    def list_rows(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        """Tasks in ``status``, oldest (by enqueue order) first."""
        queues = [enc(queue)] if queue is not None else _listdir(os.path.join(self.base, "q"))
        found: list[tuple[str, str, TaskStatus, list[str]]] = []
        for qenc in queues:
            for directory, name, found_status, extra in self._locate_all(dec(qenc), status):
                found.append((directory, name, found_status, extra))
        found.sort(key=lambda item: item[3][3])
        rows = []
        for _, _, found_status, (attempts, due, lease, _, idenc) in found[:limit]:
            header = self._header(idenc)
            if header is not None:
                row = StoredRow(dec(idenc), header[1], found_status, int(attempts), key_time(due),
                                lease or None, self._error(idenc))  # fmt: skip
                rows.append(row)
        return rows

    def _locate_all(
        self, queue: str, status: TaskStatus
    ) -> Iterator[tuple[str, str, TaskStatus, list[str]]]:
        """Every state name of ``status`` in ``queue``: (…, [attempts, due, lease, seq, id])."""
        if status.is_final:
            directory = self._done_dir(status.value, enc(queue))
            for name in _listdir(directory):
                p = name.split(".")
                if len(p) == 6:
                    yield directory, name, status, [p[4], p[5], "", p[2], p[3]]
        elif status is TaskStatus.RUNNING:
            directory = self._qdir(queue, "leased")
            for name in _listdir(directory):
                p = name.split(".")
                if len(p) == 7:
                    yield directory, name, status, [p[5], p[6], p[1], p[3], p[4]]
        else:
            for kind in ("ready", "sched"):
                directory = self._qdir(queue, kind)
                for name in _listdir(directory):
                    p = name.split(".")
                    if len(p) == 5:
                        fields = [p[3], p[4], "", p[1], p[2]] if kind == "ready" else [
                            p[4], p[0], "", p[2], p[3]]  # fmt: skip
                        yield directory, name, status, fields

    # -- retention -------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        """Forget succeeded, cancelled and expired tasks older than ``retention_seconds``."""
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_SECONDS
        cutoff = time_key(now - self.retention_seconds)
        for status in ("succeeded", "cancelled", "expired"):
            root = os.path.join(self.base, "done", status)
            for qenc in _listdir(root):
                directory = os.path.join(root, qenc)
                for name in _listdir(directory):
                    if name < cutoff:
                        idenc = name.split(".")[3]
                        _unlink(os.path.join(self.ids, idenc))
                        _unlink(os.path.join(self.errors, idenc))
                        _unlink(os.path.join(directory, name))

    def close(self) -> None:
        self._held.clear()
        self.bell.release()


class FileTaskQueue(TaskQueue):
    """Tasks as files under ``base_dir``: a local path, ``file://``, or any fsspec URL
    that can give exclusive claims (``s3://bucket/prefix``, ``gs://``, ``abfs://``,
    ``memory://``), with ``storage_options`` passed to fsspec.

    ``fsync=True`` makes an enqueue durable across power loss on local disks (the
    record and the directories are synced before it returns). ``retention_seconds``:
    how long succeeded, cancelled and expired tasks stay visible to ``get_task``.
    ``max_poll_seconds``: the longest an idle worker sleeps before it looks again,
    for changes no notification reports (other hosts of a shared disk; object stores).
    A filesystem that cannot give exclusive claims is refused here, before any I/O.
    """

    schemes = ("file", "s3", "gs", "gcs", "abfs", "az")
    supports_blocking_put = True

    def __init__(
        self,
        base_dir: str | os.PathLike[str] = "./omniq_tasks",
        *,
        storage_options: dict[str, Any] | None = None,
        fsync: bool = False,
        retention_seconds: float = 3600.0,
        max_poll_seconds: float = 1.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        path = _fs.local_path(base_dir)
        # Absolute now: a later chdir must not split one queue across two directories.
        self.base_dir = path if path is not None else os.fspath(base_dir).rstrip("/")
        self.is_local = path is not None
        if not self.is_local:
            _fs.check_exclusive(self.base_dir)
        self.storage_options = dict(storage_options or {})
        self.fsync = fsync
        self.retention_seconds = retention_seconds
        self.max_poll_seconds = max_poll_seconds
        self._local: LocalQueue | None = None
        self._objects: _fs.ObjectQueue | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FileTaskQueue:
        """``file:///abs/dir``, ``file://relative/dir``, ``s3://bucket/prefix``, ``gs://…``."""
        return cls(url, **options)

    def default_result_storage(self) -> FileResultStorage:
        """Results beside the tasks, in ``<base_dir>/results``: what ``OmniQ`` uses by default."""
        from ..results.file import FileResultStorage

        return FileResultStorage(self.base_dir, storage_options=self.storage_options)

    def _disk(self) -> LocalQueue | None:
        if not self.is_local:
            return None
        with self._lock:
            if self._local is None:
                self._local = LocalQueue(
                    self.base_dir, fsync=self.fsync, retention_seconds=self.retention_seconds,
                    max_poll_seconds=self.max_poll_seconds,
                )  # fmt: skip
            return self._local

    def _store(self) -> _fs.ObjectQueue:
        with self._lock:
            if self._objects is None:
                protocol = _fs.check_exclusive(self.base_dir)
                fs, root = _fs.open_fs(self.base_dir, self.storage_options)
                self._objects = _fs.ObjectQueue(
                    _fs.Store(fs, protocol), root, retention_seconds=self.retention_seconds,
                    max_poll_seconds=self.max_poll_seconds,
                )  # fmt: skip
            return self._objects

    # -- primitives -------------------------------------------------------------------
    async def _put(self, rows: Sequence[NewRow]) -> list[bool]:
        disk = self._disk()
        return disk.put(rows) if disk else await self._store().put(rows)

    def _put_blocking(self, rows: Sequence[NewRow]) -> list[bool]:
        disk = self._disk()
        if disk is not None:
            return disk.put(rows)
        objects = self._store()
        return objects.store.run_blocking(objects.put(rows))

    async def _claim(
        self, queues: Sequence[str], limit: int, now: float, lease_until: float, lease_id: str
    ) -> list[StoredRow]:
        disk = self._disk()
        if disk is not None:
            return disk.claim(queues, limit, now, lease_until, lease_id)
        return await self._store().claim(queues, limit, now, lease_until, lease_id)

    def _wake_generation(self) -> int:
        disk = self._disk()
        return disk.bell.wakeup.generation if disk else self._store().generation()

    async def _wait(self, queues: Sequence[str], timeout: float, since: int) -> None:
        disk = self._disk()
        await (disk.wait if disk else self._store().wait)(queues, timeout, since)

    async def _finish(
        self, refs: Sequence[LeaseRef], status: TaskStatus, error: str | None
    ) -> list[bool]:
        disk = self._disk()
        return disk.finish(refs, status, error) if disk else await self._store().finish(
            refs, status, error)  # fmt: skip

    async def _retry(self, ref: LeaseRef, due_at: float, error: str | None) -> bool:
        disk = self._disk()
        return disk.retry(ref, due_at, error) if disk else await self._store().retry(
            ref, due_at, error)  # fmt: skip

    async def _release(self, refs: Sequence[LeaseRef]) -> None:
        disk = self._disk()
        if disk is not None:
            disk.release(refs)
        else:
            await self._store().release(refs)

    async def _extend(self, refs: Sequence[LeaseRef], lease_until: float) -> list[bool]:
        disk = self._disk()
        return disk.extend(refs, lease_until) if disk else await self._store().extend(
            refs, lease_until)  # fmt: skip

    async def _cancel(self, task_id: str) -> bool:
        disk = self._disk()
        return disk.cancel(task_id) if disk else await self._store().cancel(task_id)

    async def _get(self, task_id: str) -> StoredRow | None:
        disk = self._disk()
        return disk.get(task_id) if disk else await self._store().get(task_id)

    async def _count(self, queue: str) -> int:
        disk = self._disk()
        return disk.count(queue) if disk else await self._store().count(queue)

    async def _list(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        disk = self._disk()
        return disk.list_rows(status, queue, limit) if disk else await self._store().list_rows(
            status, queue, limit)  # fmt: skip

    async def _requeue(self, task_id: str, now: float) -> bool:
        disk = self._disk()
        return disk.requeue(task_id, now) if disk else await self._store().requeue(task_id, now)

    async def _close(self) -> None:
        with self._lock:
            local, self._local = self._local, None
            objects, self._objects = self._objects, None
        if local is not None:
            local.close()
        if objects is not None:
            await objects.close()
