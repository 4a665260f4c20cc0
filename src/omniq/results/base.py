"""The result storage contract: one record per finished task, kept for its ``result_ttl``."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import ClassVar

import msgspec


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
