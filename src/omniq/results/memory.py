"""In-process result storage: a dict under one lock, shared by every thread of the process."""

from __future__ import annotations

import copy
import heapq
import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..queue._wakeup import Wakeup
from .base import ResultStorage, TaskResult

#: The expiry heap is rebuilt when stale items (overwritten or deleted
#: results) outnumber live ones by this factor, so rewriting one long-lived
#: result in a loop cannot grow it without bound.
_HEAP_SLACK = 2
_HEAP_MIN_REBUILD = 64


class MemoryResultStorage(ResultStorage):
    """Results in this process's memory; every thread and event loop of the process shares them.

    Expiry runs on the monotonic clock, so a wall-clock jump neither expires
    nor revives a result. An expired result is invisible at once and removed
    lazily: ``set_many`` drains an expiry heap, keeping memory bounded by the
    results still live. Records are copied in and out, so a caller mutating
    its ``TaskResult`` never changes what another caller reads, as with the
    backends that serialize. Not persistent; ``close`` keeps the data.
    """

    schemes = ("memory",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wakeup = Wakeup()
        self._seq = itertools.count()
        #: task id -> (result, monotonic expiry or None, seq of the write)
        self._results: dict[str, tuple[TaskResult, float | None, int]] = {}
        #: (expires_at, seq, task id); an item whose seq no longer matches the
        #: stored entry is stale (the result was overwritten or deleted).
        self._expiry: list[tuple[float, int, str]] = []

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryResultStorage:
        return cls(**options)

    async def set_many(self, results: Sequence[tuple[TaskResult, float | None]]) -> None:
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            for result, ttl in results:
                seq = next(self._seq)
                expires_at = None if ttl is None else now + ttl
                self._results[result.task_id] = (copy.copy(result), expires_at, seq)
                if expires_at is not None:
                    heapq.heappush(self._expiry, (expires_at, seq, result.task_id))
        self._wakeup.notify()

    async def get(self, task_id: str) -> TaskResult | None:
        with self._lock:
            entry = self._results.get(task_id)
        if entry is None:
            return None
        result, expires_at, _ = entry
        if expires_at is not None and expires_at <= time.monotonic():
            return None
        return copy.copy(result)

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        """Sleep until a ``set_many`` from any thread or event loop, then look again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Read the generation before looking: a set between the look and
            # the wait then makes the wait return at once instead of being lost.
            since = self._wakeup.generation
            result = await self.get(task_id)
            if result is not None:
                return result
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            await self._wakeup.wait(remaining, since)

    async def delete(self, task_id: str) -> None:
        with self._lock:
            self._results.pop(task_id, None)

    def _prune(self, now: float) -> None:
        """Drop expired results (called with the lock held)."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, seq, task_id = heapq.heappop(heap)
            entry = self._results.get(task_id)
            if entry is not None and entry[2] == seq:
                del self._results[task_id]
        if len(heap) > max(_HEAP_MIN_REBUILD, _HEAP_SLACK * len(self._results)):
            self._expiry = [
                (expires_at, seq, task_id)
                for task_id, (_, expires_at, seq) in self._results.items()
                if expires_at is not None
            ]
            heapq.heapify(self._expiry)
