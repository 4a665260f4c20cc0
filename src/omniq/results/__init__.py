"""Where workers record what finished tasks returned or raised."""

from __future__ import annotations

from .base import ResultStorage, TaskResult
from .memory import MemoryResultStorage
from .sqlite import SQLiteResultStorage

__all__ = ["MemoryResultStorage", "ResultStorage", "SQLiteResultStorage", "TaskResult"]
