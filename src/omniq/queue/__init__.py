"""Task queue backends. Each is imported on first access, so optional drivers are only
needed by whoever uses that backend."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import TaskQueue

if TYPE_CHECKING:
    from .file import FileTaskQueue
    from .memory import MemoryTaskQueue
    from .nats import NATSTaskQueue
    from .postgres import PostgreSQLTaskQueue
    from .redis import RedisTaskQueue
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

_BUILT = {
    "FileTaskQueue": ".file",
    "MemoryTaskQueue": ".memory",
    "NATSTaskQueue": ".nats",
    "PostgreSQLTaskQueue": ".postgres",
    "RedisTaskQueue": ".redis",
    "SQLiteTaskQueue": ".sqlite",
}
_PLANNED: dict[str, str] = {}


def __getattr__(name: str) -> Any:
    if name in _BUILT:
        return getattr(importlib.import_module(_BUILT[name], __name__), name)
    if name in _PLANNED:
        from ._planned import planned_backend

        return planned_backend(name, _PLANNED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
