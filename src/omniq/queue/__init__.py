"""Task queue backends. Each is imported on first access, so optional drivers are only
needed by whoever uses that backend."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import TaskQueue

if TYPE_CHECKING:
    from .memory import MemoryTaskQueue
    from .sqlite import SQLiteTaskQueue

__all__ = [
    "FileTaskQueue",
    "MemoryTaskQueue",
    "NATSTaskQueue",
    "PostgreSQLTaskQueue",
    "RedisTaskQueue",
    "SQLiteTaskQueue",
    "TaskQueue",
]

_BUILT = {"MemoryTaskQueue": ".memory", "SQLiteTaskQueue": ".sqlite"}
_PLANNED = {
    "FileTaskQueue": "files over fsspec",
    "PostgreSQLTaskQueue": "PostgreSQL",
    "RedisTaskQueue": "Redis",
    "NATSTaskQueue": "NATS JetStream",
}


def __getattr__(name: str) -> Any:
    if name in _BUILT:
        return getattr(importlib.import_module(_BUILT[name], __name__), name)
    if name in _PLANNED:
        from ._planned import planned_backend

        return planned_backend(name, _PLANNED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
