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
}
_EVENTS = {
    "memory": "omniq.events.memory:MemoryEventStorage",
    "sqlite": "omniq.events.sqlite:SQLiteEventStorage",
    "file": "omniq.events.jsonl:JSONLEventStorage",
    "jsonl": "omniq.events.jsonl:JSONLEventStorage",
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
        url = _default_results_url(queue)
    storage: ResultStorage = _from_url("result storage", _RESULTS, url)
    return storage


def _default_results_url(queue: TaskQueue) -> str:
    database_path = getattr(queue, "database_path", None)
    if database_path is not None:
        return f"sqlite:///{database_path}"
    return "memory://"


def event_storage(value: EventStorage | str | None) -> EventStorage | None:
    """The event storage, or None: events are off unless configured."""
    if isinstance(value, EventStorage):
        return value
    url = value or os.environ.get(EVENT_STORAGE_ENV)
    if not url:
        return None
    storage: EventStorage = _from_url("event storage", _EVENTS, url)
    return storage
