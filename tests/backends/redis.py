"""Redis: every test gets its own key prefix on the session's server, deleted afterwards."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from omniq.queue.base import TaskQueue
from omniq.queue.redis import RedisTaskQueue
from omniq.results.redis import RedisResultStorage
from omniq.testing.contract import MakeQueue


def unique_prefix(request: pytest.FixtureRequest, url: str) -> str:
    """A fresh key prefix whose keys are deleted when the test ends."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: delete_prefix(url, prefix))
    return prefix


def delete_prefix(url: str, prefix: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=f"{{{prefix}}}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start : start + 1000])


def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueue:
    url: str = request.getfixturevalue("redis_server")
    prefix = unique_prefix(request, url)

    def make(**options: Any) -> TaskQueue:
        return RedisTaskQueue(url=url, prefix=prefix, **options)

    return make


def result_storage(request: pytest.FixtureRequest, tmp_path: Path) -> RedisResultStorage:
    url: str = request.getfixturevalue("redis_server")
    return RedisResultStorage(url=url, prefix=unique_prefix(request, url))
