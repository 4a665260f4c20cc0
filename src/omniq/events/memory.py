"""In-process event log: a bounded deque under one lock. Fast, shared by threads, not persistent."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from .._events import Event, EventType
from .base import EventStorage


class MemoryEventStorage(EventStorage):
    """Events in this process's memory, in append order.

    Bounded by ``max_events`` (None: unbounded) so that a long-running process
    that nobody queries does not grow without limit; the oldest events are
    dropped first. A deque with ``maxlen`` does the dropping in O(1) per event.
    Events are stored as given, not copied: treat appended events as immutable.
    """

    schemes = ("memory",)

    def __init__(self, *, max_events: int | None = 100_000) -> None:
        if max_events is not None and max_events < 1:
            raise ValueError(f"max_events must be at least 1 or None, not {max_events}")
        self.max_events = max_events
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=max_events)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryEventStorage:
        return cls(**options)

    async def append(self, events: Sequence[Event]) -> None:
        with self._lock:
            self._events.extend(events)

    async def query(
        self,
        *,
        task_id: str | None = None,
        type: EventType | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        with self._lock:
            return select(self._events, task_id, type, since, until, limit)


def select(
    events: Iterable[Event],
    task_id: str | None,
    type: EventType | None,
    since: float | None,
    until: float | None,
    limit: int | None,
) -> list[Event]:
    """The events matching every given filter, in iteration order, stopping at ``limit``.

    Shared by the storages that scan (memory, JSONL) so their filters agree exactly.
    """
    found: list[Event] = []
    if limit is not None and limit <= 0:
        return found
    for event in events:
        if (
            (task_id is None or event.task_id == task_id)
            and (type is None or event.type == type)
            and (since is None or event.at >= since)
            and (until is None or event.at < until)
        ):
            found.append(event)
            if limit is not None and len(found) >= limit:
                break
    return found
