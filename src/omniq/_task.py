"""The task model: what ``enqueue`` stores and ``dequeue`` hands to a worker."""

from __future__ import annotations

import enum
import random
import time
from datetime import datetime, timezone
from typing import Any

import msgspec


class TaskStatus(str, enum.Enum):
    """Where a task is in its life.

    ``PENDING`` covers tasks waiting for their due time (``eta``, retry backoff)
    as well as ready ones; ``RUNNING`` means leased by a worker.
    """

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self not in (TaskStatus.PENDING, TaskStatus.RUNNING)


class Task(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One call to run: ``func(*args, **kwargs)`` in ``queue_name``.

    ``func`` is an import path (``"package.module:function"``), never code, so
    a queue only ever names functions the worker can already import. Times are
    Unix timestamps (seconds) so every backend orders on plain numbers; ``eta``
    gives the due time as a ``datetime``.
    """

    id: str
    func: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    queue_name: str = "default"
    priority: int = 0
    enqueued_at: float = 0.0
    due_at: float = 0.0
    expires_at: float | None = None
    max_retries: int = 0
    timeout: float | None = None
    result_ttl: float | None = None
    # Mutable state, kept by the queue backend, not by the encoded payload.
    status: TaskStatus = TaskStatus.PENDING
    attempts: int = 0
    error: str | None = None
    lease_id: str | None = None

    @property
    def eta(self) -> datetime | None:
        """The due time, or None when the task was due as soon as enqueued."""
        if self.due_at <= self.enqueued_at:
            return None
        return datetime.fromtimestamp(self.due_at, tz=timezone.utc)


def new_task_id() -> str:
    """32 hex characters: the time in nanoseconds, then 64 random bits.

    Time-ordered, so ids of new tasks land at the end of a B-tree index (one hot
    page per insert rather than a random one) and sort roughly by creation.
    """
    # random (reseeded after fork by CPython) is half the cost of os.urandom here;
    # ids need uniqueness, not secrecy. One 128-bit number's hex: 0.2 µs, where
    # formatting the two halves takes 0.5.
    return (time.time_ns() << 64 | random.getrandbits(64)).to_bytes(16, "big").hex()
