"""The result storage contract: one record per finished task, kept for its ``result_ttl``."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import ClassVar

import msgspec

#: Longest single sleep of ``_wait_notified`` (a wait without timeout sleeps again).
_WAIT_CHUNK = 3600.0


class TaskResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a worker recorded for a finished task.

    ``value`` is the return value encoded by the serializer (None when the
    task failed); a failure carries the remote exception's type name, message
    and traceback.
    """

    task_id: str
    succeeded: bool
    value: bytes | None = None
    exc_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    finished_at: float = 0.0


class ResultStorage(ABC):
    """Stores ``TaskResult`` records by task id, each expiring after its ttl.

    Constructors do no I/O. Backends that can be told about new results
    (a notification, a blocking read) override ``wait``; the default polls
    with a short, growing interval.
    """

    schemes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    async def set_many(self, results: Sequence[tuple[TaskResult, float | None]]) -> None:
        """Store ``(result, ttl_seconds)`` pairs in one round trip (ttl None: keep)."""

    @abstractmethod
    async def get(self, task_id: str) -> TaskResult | None:
        """The stored result, or None if there is none or it expired."""

    async def wait(self, task_id: str, timeout: float | None) -> TaskResult | None:
        """Wait until the result exists (None after ``timeout``; ``timeout=None`` waits on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.005
        while True:
            result = await self.get(task_id)
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                return None
            pause = interval if deadline is None else min(interval, deadline - time.monotonic())
            await asyncio.sleep(max(0.0, pause))
            interval = min(interval * 2, 0.5)

    async def _wait_notified(
        self,
        task_id: str,
        timeout: float | None,
        generation: Callable[[], int],
        sleep: Callable[[float, int], Awaitable[object]],
    ) -> TaskResult | None:
        """``wait`` for a store that announces changes: look, then ``sleep(seconds,
        since)`` until a change after generation ``since`` (or the time is up), and
        look again. The generation is read before each look, so a result stored
        between the look and the sleep ends the sleep at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            since = generation()
            result = await self.get(task_id)
            if result is not None:
                return result
            remaining = _WAIT_CHUNK if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            await sleep(min(remaining, _WAIT_CHUNK), since)

    async def delete(self, task_id: str) -> None:
        """Forget a result (default: no-op for stores that only expire)."""

    async def close(self) -> None:
        """Release files or connections; the instance may be used again."""

    async def __aenter__(self) -> ResultStorage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
