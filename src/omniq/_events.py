"""The task lifecycle as typed events, emitted by the core and buffered on their way to storage."""

from __future__ import annotations

import enum
import time

import msgspec


class EventType(str, enum.Enum):
    ENQUEUED = "enqueued"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    LEASE_LOST = "lease_lost"


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One state change of one task.

    ``at`` is a Unix time in seconds. ``detail`` carries what the type needs:
    the error for FAILED and RETRYING, the retry delay, the reason for EXPIRED.
    """

    task_id: str
    type: EventType
    at: float = msgspec.field(default_factory=time.time)
    queue_name: str = "default"
    func: str = ""
    attempts: int = 0
    worker: str | None = None
    detail: str | None = None
