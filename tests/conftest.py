"""Backends under test: see ``tests/backends`` (how to build each) and ``tests/servers``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from omniq.results.base import ResultStorage
from omniq.testing.contract import MakeQueue

from .backends import QUEUE_BACKENDS, RESULT_BACKENDS

#: Session fixtures that start real servers (one module per server).
pytest_plugins: list[str] = [
    "tests.servers.redis",
    "tests.servers.postgres",
    "tests.servers.s3",
    "tests.servers.nats",
]


def _backend(name: str) -> object:
    return importlib.import_module(f"tests.backends.{name}")


@pytest.fixture(params=QUEUE_BACKENDS)
def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    """A factory of queue instances that share one fresh storage for the test."""
    factory: MakeQueue = _backend(request.param).queue_factory(request, tmp_path)  # type: ignore[attr-defined]
    return factory


@pytest.fixture(params=RESULT_BACKENDS)
def result_storage_factory(request: pytest.FixtureRequest, tmp_path: Path) -> ResultStorage:
    """A fresh result storage of each backend."""
    storage: ResultStorage = _backend(request.param).result_storage(request, tmp_path)  # type: ignore[attr-defined]
    return storage
