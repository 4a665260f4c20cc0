"""fsspec's memory filesystem (the object-store protocol, in-process): a fresh root per
test, removed afterwards."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from omniq.queue.base import TaskQueue
from omniq.queue.file import FileTaskQueue
from omniq.results.file import FileResultStorage
from omniq.testing.contract import MakeQueue


def unique_root(request: pytest.FixtureRequest) -> str:
    import fsspec

    name = f"omniq-test-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("memory")
    request.addfinalizer(lambda: fs.rm(f"/{name}", recursive=True) if fs.exists(name) else None)
    return f"memory://{name}"


def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    root = unique_root(request)

    def make(**options: Any) -> TaskQueue:
        return FileTaskQueue(root, **options)

    return make


def result_storage(request: pytest.FixtureRequest, tmp_path: Path) -> FileResultStorage:
    return FileResultStorage(unique_root(request))
