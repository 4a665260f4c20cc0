from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniq.queue.base import TaskQueue
from omniq.queue.postgres import PostgreSQLTaskQueue
from omniq.results.postgres import PostgreSQLResultStorage
from omniq.testing.contract import MakeQueue


def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    dsn: str = request.getfixturevalue("postgres_dsn")  # a fresh schema for this test

    def make(**options: Any) -> TaskQueue:
        return PostgreSQLTaskQueue(dsn, **options)

    return make


def result_storage(request: pytest.FixtureRequest, tmp_path: Path) -> PostgreSQLResultStorage:
    return PostgreSQLResultStorage(request.getfixturevalue("postgres_dsn"))
