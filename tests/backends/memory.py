from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniq.queue import MemoryTaskQueue
from omniq.queue.base import TaskQueue
from omniq.results.memory import MemoryResultStorage
from omniq.testing.contract import MakeQueue


def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    shared = MemoryTaskQueue()

    def make(**options: Any) -> TaskQueue:
        # One in-process store: further instances are the same object,
        # re-configured, as a second connection to it would be.
        for name, value in options.items():
            setattr(shared, name, value)
        return shared

    return make


def result_storage(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryResultStorage:
    return MemoryResultStorage()
