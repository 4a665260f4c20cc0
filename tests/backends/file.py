"""Local disk: every test gets its own directory under ``tmp_path``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniq.queue.base import TaskQueue
from omniq.queue.file import FileTaskQueue
from omniq.results.file import FileResultStorage
from omniq.testing.contract import MakeQueue


def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    base = tmp_path / "tasks"

    def make(**options: Any) -> TaskQueue:
        return FileTaskQueue(base, **options)

    return make


def result_storage(request: pytest.FixtureRequest, tmp_path: Path) -> FileResultStorage:
    return FileResultStorage(tmp_path / "results")
