"""Backends under test. Adding a backend to the contract suite is adding a parameter here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniq.queue import MemoryTaskQueue, SQLiteTaskQueue
from omniq.queue.base import TaskQueue

QUEUE_BACKENDS = ["memory", "sqlite"]


@pytest.fixture(params=QUEUE_BACKENDS)
def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A factory of queue instances that share one fresh storage for the test."""
    backend = request.param
    if backend == "memory":
        shared = MemoryTaskQueue()

        def make(**options: Any) -> TaskQueue:
            # One in-process store: further instances are the same object,
            # re-configured, as a second connection to it would be.
            for name, value in options.items():
                setattr(shared, name, value)
            return shared

        return make
    database = tmp_path / "tasks.db"
    return lambda **options: SQLiteTaskQueue(database, **options)
