"""The event storage contract: append batches, query by task, type and time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, ClassVar

from .._events import Event, EventType


class EventStorage(ABC):
    """Append-only log of task events. Constructors do no I/O.

    The core buffers events and calls ``append`` with batches from a
    background task, so a slow storage never slows a task down.
    """

    schemes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    async def append(self, events: Sequence[Event]) -> None:
        """Store a batch of events, in order, in one round trip."""

    @abstractmethod
    async def query(
        self,
        *,
        task_id: str | None = None,
        type: EventType | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events matching every given filter (``since <= at < until``), oldest first."""

    async def close(self) -> None:
        """Flush and release files or connections; the instance may be used again."""

    async def __aenter__(self) -> EventStorage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def event_from_row(row: Iterable[Any]) -> Event:
    """An ``Event`` from a SQL row ``(task_id, type, at, queue_name, func, attempts,
    worker, detail)``; NULL columns (rows written by other tools) read as the defaults."""
    task_id, type, at, queue_name, func, attempts, worker, detail = row
    return Event(
        task_id=task_id,
        type=EventType(type),
        at=at,
        queue_name="default" if queue_name is None else queue_name,
        func="" if func is None else func,
        attempts=0 if attempts is None else attempts,
        worker=worker,
        detail=detail,
    )
