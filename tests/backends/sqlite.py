from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniq.queue import SQLiteTaskQueue
from omniq.queue.base import TaskQueue
from omniq.results.sqlite import SQLiteResultStorage
from omniq.testing.contract import MakeQueue


def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    database = tmp_path / "tasks.db"

    def make(**options: Any) -> TaskQueue:
        return SQLiteTaskQueue(database, **options)

    return make


def result_storage(request: pytest.FixtureRequest, tmp_path: Path) -> SQLiteResultStorage:
    return SQLiteResultStorage(tmp_path / "omniq.db")
