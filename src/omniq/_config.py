"""Building components from instances, URL strings or ``OMNIQ_*`` environment variables.

One registry maps URL schemes to backend classes, imported lazily so that a
missing optional driver only matters to whoever uses that backend.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, TypeVar

from ._errors import ConfigurationError
from .events.base import EventStorage
from .queue.base import TaskQueue
from .results.base import ResultStorage

DEFAULT_DATABASE = "omniq.db"
TASK_QUEUE_ENV = "OMNIQ_TASK_QUEUE_URL"
RESULT_STORAGE_ENV = "OMNIQ_RESULT_STORAGE_URL"
EVENT_STORAGE_ENV = "OMNIQ_EVENT_STORAGE_URL"

_QUEUES = {
    "memory": "omniq.queue.memory:MemoryTaskQueue",
    "sqlite": "omniq.queue.sqlite:SQLiteTaskQueue",
    "redis": "omniq.queue:RedisTaskQueue",
    "rediss": "omniq.queue:RedisTaskQueue",
    "postgresql": "omniq.queue:PostgreSQLTaskQueue",
    "postgres": "omniq.queue:PostgreSQLTaskQueue",
    "nats": "omniq.queue:NATSTaskQueue",
    "file": "omniq.queue:FileTaskQueue",
    "s3": "omniq.queue:FileTaskQueue",
}
_RESULTS = {
    "memory": "omniq.results.memory:MemoryResultStorage",
    "sqlite": "omniq.results.sqlite:SQLiteResultStorage",
    "file": "omniq.results.file:FileResultStorage",
    "s3": "omniq.results.file:FileResultStorage",
    "postgresql": "omniq.results.postgres:PostgreSQLResultStorage",
    "postgres": "omniq.results.postgres:PostgreSQLResultStorage",
    "redis": "omniq.results.redis:RedisResultStorage",
    "rediss": "omniq.results.redis:RedisResultStorage",
    "nats": "omniq.results.nats:NATSResultStorage",
}
_EVENTS = {
    "memory": "omniq.events.memory:MemoryEventStorage",
    "sqlite": "omniq.events.sqlite:SQLiteEventStorage",
    "file": "omniq.events.jsonl:JSONLEventStorage",
    "jsonl": "omniq.events.jsonl:JSONLEventStorage",
    "s3": "omniq.events.jsonl:JSONLEventStorage",
    "postgresql": "omniq.events.postgres:PostgreSQLEventStorage",
    "postgres": "omniq.events.postgres:PostgreSQLEventStorage",
    "redis": "omniq.events.redis:RedisEventStorage",
    "rediss": "omniq.events.redis:RedisEventStorage",
    "nats": "omniq.events.nats:NATSEventStorage",
}

C = TypeVar("C")


def _from_url(kind: str, registry: dict[str, str], url: str, **options: Any) -> Any:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    target = registry.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in registry)
        raise ConfigurationError(f"unsupported {kind} URL {url!r}; use one of: {known}")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_url(url, **options)


def task_queue(value: TaskQueue | str | None, **options: Any) -> TaskQueue:
    if isinstance(value, TaskQueue):
        return value
    url = value or os.environ.get(TASK_QUEUE_ENV) or f"sqlite:///{DEFAULT_DATABASE}"
    queue: TaskQueue = _from_url("task queue", _QUEUES, url, **options)
    return queue


def result_storage(value: ResultStorage | str | None, queue: TaskQueue) -> ResultStorage:
    """The result storage; by default the queue's own engine where it has one."""
    if isinstance(value, ResultStorage):
        return value
    url = value or os.environ.get(RESULT_STORAGE_ENV)
    if url is None:
        # By default results live with the tasks: same file or server.
        default = queue.default_result_storage()
        if default is not None:
            return default
        url = "memory://"
    storage: ResultStorage = _from_url("result storage", _RESULTS, url)
    return storage


def event_storage(value: EventStorage | str | None) -> EventStorage | None:
    """The event storage, or None: events are off unless configured."""
    if isinstance(value, EventStorage):
        return value
    url = value or os.environ.get(EVENT_STORAGE_ENV)
    if not url:
        return None
    storage: EventStorage = _from_url("event storage", _EVENTS, url)
    return storage
