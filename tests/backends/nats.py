"""NATS: every test gets its own streams on the session's server, deleted afterwards."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from omniq.queue.base import TaskQueue
from omniq.queue.nats import NATSTaskQueue
from omniq.results.nats import NATSResultStorage
from omniq.testing.contract import MakeQueue

from ..servers.nats import delete_streams


def unique_name(request: pytest.FixtureRequest, url: str, *streams: str) -> str:
    """A fresh name; the streams named after it (``{}`` in ``streams``) go when the test ends."""
    name = f"T{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: delete_streams(url, *(s.format(name) for s in streams)))
    return name


def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    url: str = request.getfixturevalue("nats_server")
    stream = unique_name(request, url, "{}", "KV_{}_RESULTS")

    def make(**options: Any) -> TaskQueue:
        return NATSTaskQueue([url], stream=stream, **options)

    return make


def result_storage(request: pytest.FixtureRequest, tmp_path: Path) -> NATSResultStorage:
    url: str = request.getfixturevalue("nats_server")
    return NATSResultStorage(url, bucket=unique_name(request, url, "KV_{}"))
