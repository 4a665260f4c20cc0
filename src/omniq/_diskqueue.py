"""The File backend on local and shared (POSIX) disks: the rename protocol.

A task is one record, reached under two names (hard links): its id ``ids/<id>``
and one *state name* that moves with ``rename(2)`` between the state directories.
Only one of several renamers of a name succeeds, so each state change (claim, ack,
recovery, cancel, …) happens once::

    ids/<id>                                        the record (in a pack: ``omniq._packs``)
    q/<queue>/ready/<prio>.<seq>.<id>.<attempts>.<due>              due now: a sorted
    q/<queue>/sched/<due>.<prio>.<seq>.<id>.<attempts>              listing is the order
    q/<queue>/leased/<until>.<lease>.<prio>.<seq>.<id>.<attempts>.<due>
    done/<status>/<queue>/<finished>.<prio>.<seq>.<id>.<attempts>.<due>
    errors/<id>                                     the last error, when there is one
    tmp/                                            packs being written; names set aside
    .doorbell                                       rung after every change that adds work

Every key is fixed-width hex (``<prio>`` inverted), so names sort in delivery order.
Records live in packs, files that hold many tasks (``omniq._packs``): a task's names
are hard links to its pack, and its ``<seq>`` finds it there. The full protocol, and
what each filesystem guarantees, is in ``docs/backends/file.md``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import _doorbell
from ._fs import dec, enc, enc_id, key_time, listdir, prio_key, time_key, unlink_quietly
from ._packs import Packs, Slot, read_payload, read_queue
from ._task import TaskStatus
from .queue.base import LeaseRef, NewRow, StoredRow

_FINAL = ("succeeded", "failed", "cancelled", "expired")
#: A listing of a directory that other processes write is taken again after this long
#: even without a doorbell (writers on other hosts of a shared disk ring no inotify).
RELIST_SECONDS = 1.0
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


#: A batch's tasks mostly share their priority and due time: keys made once.
_prio_key = functools.lru_cache(maxsize=64)(prio_key)
_time_key = functools.lru_cache(maxsize=64)(time_key)


def _state_dir(qdir: str, slot: Slot) -> str:
    return f"{qdir}/sched" if slot.scheduled else f"{qdir}/ready"


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
        self.packs = Packs(base, fsync=fsync)
        self._shared = _shared_state(base)
        self._held: dict[str, tuple[str, str]] = {}  # id → (leased dir, name)
        self._qdirs: dict[tuple[str, str], str] = {}
        self._queues: dict[str, tuple[str, str]] = {}
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
        """Store ``rows`` in packs: one per queue, a single task appended to an open one."""
        repaired = self.packs.repaired
        if len(rows) == 1:
            row = rows[0]
            slot = Slot(enc_id(row.id), _prio_key(row.priority), time_key(row.due_at),
                        row.due_at > time.time(), row.payload)  # fmt: skip
            qenc, qdir = self._queue_dir(row.queue)
            new = self.packs.append(qenc, qdir, slot)
            self._published({_state_dir(qdir, slot)} if new else set(), repaired)
            return [new]
        now = time.time()
        slots = [  # every name is checked before anything is written
            Slot(enc_id(r.id), _prio_key(r.priority), _time_key(r.due_at), r.due_at > now,
                 r.payload)
            for r in rows
        ]  # fmt: skip
        queues = {row.queue for row in rows}
        inserted = [False] * len(rows)
        touched: set[str] = set()
        for queue in queues:
            qenc, qdir = self._queue_dir(queue)
            indexes = range(len(rows)) if len(queues) == 1 else [
                i for i, row in enumerate(rows) if row.queue == queue]  # fmt: skip
            group = [slots[i] for i in indexes]
            done = self.packs.write(qenc, qdir, group)
            for index, slot, new in zip(indexes, group, done, strict=True):
                if new:
                    inserted[index] = True
                    touched.add(_state_dir(qdir, slot))
        self._published(touched, repaired)
        return inserted

    def _published(self, dirs: set[str], repaired: int) -> None:
        """After a put that linked state names into ``dirs``: sync them (with ``fsync``)
        and ring the doorbell, as for tasks a repair completed."""
        if dirs and self.fsync:
            self._sync_dirs({self.ids, *dirs})
        if dirs or self.packs.repaired != repaired:
            self.bell.ring()

    def _queue_dir(self, queue: str) -> tuple[str, str]:
        """``(encoded name, directory)`` of ``queue``, its ready and sched directories made."""
        found = self._queues.get(queue)
        if found is None:
            self._qdir(queue, "ready")
            self._qdir(queue, "sched")
            found = self._queues[queue] = (enc(queue), os.path.join(self.base, "q", enc(queue)))
        return found

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
                cache.ready = sorted(listdir(ready), reverse=True)
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
            payload = read_payload(os.path.join(leased_dir, leased), int(seq, 16))
        except FileNotFoundError:
            return None  # another worker took it first
        cache.leased_next = min(cache.leased_next, until)
        task_id = dec(idenc)
        self._held[task_id] = (leased_dir, leased)
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
        for name in sorted(listdir(leased)):
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
        for name in sorted(listdir(sched)):
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
        for name in listdir(leased):
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
            with open(os.path.join(self.errors, idenc), "rb") as file:
                return file.read().decode()
        except FileNotFoundError:
            return None

    def _set_error(self, idenc: str, error: str | None, attempts: int) -> None:
        path = os.path.join(self.errors, idenc)
        if error is not None:
            with open(path, "w", encoding="utf-8") as file:
                file.write(error)
        elif attempts > 1:  # only a task delivered more than once can have one
            unlink_quietly(path)

    # -- by id -----------------------------------------------------------------------------
    def _queue_of(self, idenc: str) -> str | None:
        """The queue of a task, or None if the id is unknown."""
        return read_queue(os.path.join(self.ids, idenc))

    def _payload(self, idenc: str, seq: str) -> bytes | None:
        try:
            return read_payload(os.path.join(self.ids, idenc), int(seq, 16))
        except FileNotFoundError:
            return None

    def _locate(self, queue: str, idenc: str) -> Iterator[tuple[str, str, TaskStatus, list[str]]]:
        """Where the task's state name is: (dir, name, status, [attempts, due, lease, seq])."""
        for kind in ("ready", "sched"):
            directory = self._qdir(queue, kind)
            for name in listdir(directory):
                p = name.split(".")
                if len(p) == 5 and p[2 if kind == "ready" else 3] == idenc:
                    fields = [p[3], p[4], "", p[1]] if kind == "ready" else [p[4], p[0], "", p[2]]
                    yield directory, name, TaskStatus.PENDING, fields
        leased = self._qdir(queue, "leased")
        for name in listdir(leased):
            p = name.split(".")
            if len(p) == 7 and p[4] == idenc:
                yield leased, name, TaskStatus.RUNNING, [p[5], p[6], p[1], p[3]]
        for status_name in _FINAL:
            directory = self._done_dir(status_name, enc(queue))
            for name in listdir(directory):
                p = name.split(".")
                if len(p) == 6 and p[3] == idenc:
                    yield directory, name, TaskStatus(status_name), [p[4], p[5], "", p[2]]

    def get(self, task_id: str) -> StoredRow | None:
        idenc = enc(task_id)
        for _ in range(3):  # a task may move while we look
            queue = self._queue_of(idenc)
            if queue is None:
                return None
            for _dir, _name, status, (attempts, due, lease, seq) in self._locate(queue, idenc):
                payload = self._payload(idenc, seq)
                if payload is None:
                    return None
                return StoredRow(task_id, payload, status, int(attempts), key_time(due),
                                 lease or None, self._error(idenc))  # fmt: skip
        return None

    def cancel(self, task_id: str) -> bool:
        idenc = enc(task_id)
        queue = self._queue_of(idenc)
        if queue is None:
            return False
        done = self._done_dir("cancelled", enc(queue))
        now = time_key(time.time())
        for directory, name, status, (attempts, due, _, seq) in self._locate(queue, idenc):
            if status is not TaskStatus.PENDING:
                return False
            prio = name.split(".")[0 if directory.endswith("ready") else 1]
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
            unlink_quietly(os.path.join(self.errors, idenc))
            try:
                os.rename(os.path.join(directory, name), target)
            except FileNotFoundError:
                return False
            self.bell.ring()
            return True
        return False

    def count(self, queue: str) -> int:
        return len(listdir(self._qdir(queue, "ready"))) + len(listdir(self._qdir(queue, "sched")))

    def list_rows(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        """Tasks in ``status``, oldest (by enqueue order) first."""
        queues = [enc(queue)] if queue is not None else listdir(os.path.join(self.base, "q"))
        found: list[tuple[str, str, TaskStatus, list[str]]] = []
        for qenc in queues:
            for directory, name, found_status, extra in self._locate_all(dec(qenc), status):
                found.append((directory, name, found_status, extra))
        found.sort(key=lambda item: item[3][3])
        rows = []
        for _, _, found_status, (attempts, due, lease, seq, idenc) in found[:limit]:
            payload = self._payload(idenc, seq)
            if payload is not None:
                row = StoredRow(dec(idenc), payload, found_status, int(attempts), key_time(due),
                                lease or None, self._error(idenc))  # fmt: skip
                rows.append(row)
        return rows

    def _locate_all(
        self, queue: str, status: TaskStatus
    ) -> Iterator[tuple[str, str, TaskStatus, list[str]]]:
        """Every state name of ``status`` in ``queue``: (…, [attempts, due, lease, seq, id])."""
        if status.is_final:
            directory = self._done_dir(status.value, enc(queue))
            for name in listdir(directory):
                p = name.split(".")
                if len(p) == 6:
                    yield directory, name, status, [p[4], p[5], "", p[2], p[3]]
        elif status is TaskStatus.RUNNING:
            directory = self._qdir(queue, "leased")
            for name in listdir(directory):
                p = name.split(".")
                if len(p) == 7:
                    yield directory, name, status, [p[5], p[6], p[1], p[3], p[4]]
        else:
            for kind in ("ready", "sched"):
                directory = self._qdir(queue, kind)
                for name in listdir(directory):
                    p = name.split(".")
                    if len(p) == 5:
                        fields = [p[3], p[4], "", p[1], p[2]] if kind == "ready" else [
                            p[4], p[0], "", p[2], p[3]]  # fmt: skip
                        yield directory, name, status, fields

    # -- retention -------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        """Forget succeeded, cancelled and expired tasks older than ``retention_seconds``,
        and complete the packs of enqueues that died (``Packs.repair``)."""
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_SECONDS
        if self.packs.repair_stale():
            self.bell.ring()
        cutoff = time_key(now - self.retention_seconds)
        for status in ("succeeded", "cancelled", "expired"):
            root = os.path.join(self.base, "done", status)
            for qenc in listdir(root):
                directory = os.path.join(root, qenc)
                for name in listdir(directory):
                    if name < cutoff:
                        idenc = name.split(".")[3]
                        # The id before the state name: a repair counting the pack's
                        # names meanwhile errs towards linking nothing (omniq._packs).
                        unlink_quietly(os.path.join(self.ids, idenc))
                        unlink_quietly(os.path.join(self.errors, idenc))
                        unlink_quietly(os.path.join(directory, name))

    def close(self) -> None:
        self._held.clear()
        self.packs.close()
        self.bell.release()
