"""In-process queue: heaps under one lock. Fast, shared by the whole process, not persistent."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._task import TaskStatus
from ._wakeup import Wakeup
from .base import LeaseRef, NewRow, StoredRow, TaskQueue

PENDING, RUNNING = TaskStatus.PENDING, TaskStatus.RUNNING


@dataclass(slots=True)
class _Entry:
    id: str
    queue: str
    priority: int
    seq: int
    due_at: float
    payload: bytes
    status: TaskStatus = PENDING
    attempts: int = 0
    lease_id: str | None = None
    lease_until: float = 0.0
    error: str | None = None
    version: int = 0  # bumped on every change: heap items of an older version are stale

    def row(self) -> StoredRow:
        return StoredRow(
            self.id,
            self.payload,
            self.status,
            self.attempts,
            self.due_at,
            self.lease_id,
            self.error,
        )


class MemoryTaskQueue(TaskQueue):
    """Tasks in this process's memory; every thread and event loop of the process shares them.

    Ready tasks sit in one heap per queue keyed by (-priority, enqueue order);
    future ones in a heap by due time; leased ones in a heap by lease end.
    Heaps are cleaned lazily (an item whose entry changed since is skipped),
    so every operation is O(log n). Finished tasks stay visible to
    ``get_task`` for ``retention_seconds``.
    """

    schemes = ("memory",)
    persistent = False
    supports_blocking_put = True

    def __init__(self, *, retention_seconds: float = 3600.0, **options: Any) -> None:
        super().__init__(**options)
        self.retention_seconds = retention_seconds
        self._lock = threading.Lock()
        self._wakeup = Wakeup()
        self._seq = itertools.count()
        self._tasks: dict[str, _Entry] = {}
        self._ready: dict[str, list[tuple[int, int, int, _Entry]]] = {}
        self._scheduled: list[tuple[float, int, int, _Entry]] = []
        self._leased: list[tuple[float, int, int, _Entry]] = []
        self._finished: deque[tuple[float, _Entry]] = deque()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryTaskQueue:
        return cls(**options)

    # -- primitives -------------------------------------------------------------
    async def _put(self, rows: Sequence[NewRow]) -> list[bool]:
        return self._put_blocking(rows)

    def _put_blocking(self, rows: Sequence[NewRow]) -> list[bool]:
        now = time.time()
        inserted: list[bool] = []
        with self._lock:
            for row in rows:
                if row.id in self._tasks:
                    inserted.append(False)
                    continue
                entry = _Entry(
                    row.id, row.queue, row.priority, next(self._seq), row.due_at, row.payload
                )
                self._tasks[row.id] = entry
                self._schedule(entry, now)
                inserted.append(True)
        self._wakeup.notify()
        return inserted

    async def _claim(
        self, queues: Sequence[str], limit: int, now: float, lease_until: float, lease_id: str
    ) -> list[StoredRow]:
        claimed: list[StoredRow] = []
        with self._lock:
            self._recover_and_promote(now)
            for name in queues:
                heap = self._ready.get(name)
                while heap and len(claimed) < limit:
                    *_, version, entry = heapq.heappop(heap)
                    if entry.version != version or entry.status is not PENDING:
                        continue
                    entry.status, entry.lease_id, entry.lease_until = RUNNING, lease_id, lease_until
                    entry.attempts += 1
                    entry.version += 1
                    heapq.heappush(self._leased, (lease_until, entry.seq, entry.version, entry))
                    claimed.append(entry.row())
        return claimed

    def _wake_generation(self) -> int:
        return self._wakeup.generation

    async def _wait(self, queues: Sequence[str], timeout: float, since: int) -> None:
        with self._lock:
            next_due = [heap[0][0] for heap in (self._scheduled, self._leased) if heap]
        if next_due:
            timeout = min(timeout, max(0.0, min(next_due) - time.time()))
        await self._wakeup.wait(timeout, since)

    async def _finish(
        self, refs: Sequence[LeaseRef], status: TaskStatus, error: str | None
    ) -> list[bool]:
        now = time.time()
        done: list[bool] = []
        with self._lock:
            for ref in refs:
                entry = self._leased_entry(ref)
                if entry is None:
                    done.append(False)
                    continue
                entry.status, entry.error, entry.lease_id = status, error, None
                entry.version += 1
                self._finished.append((now, entry))
                done.append(True)
        return done

    async def _retry(self, ref: LeaseRef, due_at: float, error: str | None) -> bool:
        with self._lock:
            entry = self._leased_entry(ref)
            if entry is None:
                return False
            entry.due_at, entry.error = due_at, error
            self._schedule(entry, time.time())
        self._wakeup.notify()
        return True

    async def _release(self, refs: Sequence[LeaseRef]) -> None:
        with self._lock:
            for ref in refs:
                entry = self._leased_entry(ref)
                if entry is not None:
                    entry.attempts -= 1
                    self._schedule(entry, time.time())
        self._wakeup.notify()

    async def _extend(self, refs: Sequence[LeaseRef], lease_until: float) -> list[bool]:
        extended: list[bool] = []
        with self._lock:
            for ref in refs:
                entry = self._leased_entry(ref)
                if entry is None:
                    extended.append(False)
                    continue
                entry.lease_until = lease_until
                entry.version += 1
                heapq.heappush(self._leased, (lease_until, entry.seq, entry.version, entry))
                extended.append(True)
        return extended

    async def _cancel(self, task_id: str) -> bool:
        with self._lock:
            entry = self._tasks.get(task_id)
            if entry is None or entry.status is not PENDING:
                return False
            entry.status = TaskStatus.CANCELLED
            entry.version += 1
            self._finished.append((time.time(), entry))
            return True

    async def _get(self, task_id: str) -> StoredRow | None:
        with self._lock:
            entry = self._tasks.get(task_id)
            return None if entry is None else entry.row()

    async def _count(self, queue: str) -> int:
        with self._lock:
            return sum(1 for e in self._tasks.values() if e.queue == queue and e.status is PENDING)

    async def _list(self, status: TaskStatus, queue: str | None, limit: int) -> list[StoredRow]:
        with self._lock:
            entries = [
                e
                for e in self._tasks.values()
                if e.status is status and (queue is None or e.queue == queue)
            ]
        entries.sort(key=lambda e: e.seq)
        return [e.row() for e in entries[:limit]]

    async def _requeue(self, task_id: str, now: float) -> bool:
        with self._lock:
            entry = self._tasks.get(task_id)
            if entry is None or not entry.status.is_final or entry.status is TaskStatus.SUCCEEDED:
                return False
            entry.attempts, entry.error, entry.due_at = 0, None, now
            self._schedule(entry, now)
        self._wakeup.notify()
        return True

    # -- internals (called with the lock held) --------------------------------------
    def _schedule(self, entry: _Entry, now: float) -> None:
        """Make ``entry`` pending: ready now, or waiting for its due time."""
        entry.status, entry.lease_id = PENDING, None
        entry.version += 1
        if entry.due_at <= now:
            heap = self._ready.setdefault(entry.queue, [])
            heapq.heappush(heap, (-entry.priority, entry.seq, entry.version, entry))
        else:
            heapq.heappush(self._scheduled, (entry.due_at, entry.seq, entry.version, entry))

    def _leased_entry(self, ref: LeaseRef) -> _Entry | None:
        entry = self._tasks.get(ref.id)
        if entry is None or entry.status is not RUNNING:
            return None
        if ref.lease_id is not None and entry.lease_id != ref.lease_id:
            return None
        return entry

    def _recover_and_promote(self, now: float) -> None:
        for heap in (self._leased, self._scheduled):
            while heap and heap[0][0] <= now:
                _, _, version, entry = heapq.heappop(heap)
                if entry.version == version:
                    self._schedule(entry, now)
        cutoff = now - self.retention_seconds
        while self._finished and self._finished[0][0] < cutoff:
            _, entry = self._finished.popleft()
            if entry.status.is_final and self._tasks.get(entry.id) is entry:
                del self._tasks[entry.id]
