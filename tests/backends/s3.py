"""S3 through s3fs against the session's moto server: a fresh bucket per test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniq.queue.base import TaskQueue
from omniq.queue.file import FileTaskQueue
from omniq.results.file import FileResultStorage
from omniq.testing.contract import MakeQueue


def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    server = request.getfixturevalue("s3_server")
    base = f"s3://{server.new_bucket()}/tasks"

    def make(**options: Any) -> TaskQueue:
        return FileTaskQueue(base, storage_options=server.storage_options, **options)

    return make


def result_storage(request: pytest.FixtureRequest, tmp_path: Path) -> FileResultStorage:
    server = request.getfixturevalue("s3_server")
    return FileResultStorage(
        f"s3://{server.new_bucket()}/omniq", storage_options=server.storage_options
    )
