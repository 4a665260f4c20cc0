"""Where task events go: in memory, a JSON Lines file, or a SQLite table."""

from __future__ import annotations

from .._events import Event, EventType
from .base import EventStorage
from .jsonl import JSONLEventStorage
from .memory import MemoryEventStorage
from .sqlite import SQLiteEventStorage

__all__ = [
    "Event",
    "EventStorage",
    "EventType",
    "JSONLEventStorage",
    "MemoryEventStorage",
    "SQLiteEventStorage",
]
